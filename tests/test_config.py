import re

import pytest

from flowdppo.config import Config, ConfigError, load_config, parse_algorithm, parse_overrides


def test_defaults_are_the_flow_dppo_digits_run():
    cfg = load_config()
    assert (cfg.task, cfg.objective_name, cfg.kernel) == ("digits", "dppo", "flow")
    assert cfg.samples_per_iteration == cfg.train.prompts_per_iteration * cfg.train.group_size


@pytest.mark.parametrize(
    "name,expected",
    [
        ("dppo", ("dppo", "flow")),
        ("grpo", ("clip", "flow")),
        ("cps", ("clip", "cps")),
        ("dppo+cps", ("dppo", "cps")),
        ("dppo+dance", ("dppo", "dance")),
        ("dance", ("clip", "dance")),
        ("clip+cps", ("clip", "cps")),
    ],
)
def test_algorithm_names(name, expected):
    assert parse_algorithm(name) == expected
    assert load_config(None, [f"algorithm={name}"]).kernel == expected[1]


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "algorithm: grpo\ntrain:\n  lr: 1e-4\n  group_size: 4\nobjective:\n  clip_range: 2e-4\n"
    )
    cfg = load_config(path, ["train.group_size=6", "sampler.sde_window=[0.0, 0.6]"])
    assert cfg.algorithm == "grpo" and cfg.train.lr == 1e-4 and cfg.objective.clip_range == 2e-4
    assert cfg.train.group_size == 6 and cfg.sampler.sde_window == (0.0, 0.6)


def test_override_values_are_typed():
    tree = parse_overrides(["a.b=3", "a.c=true", "d=[1, 2]", "e=x"])
    assert tree == {"a": {"b": 3, "c": True}, "d": [1, 2], "e": "x"}


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["train.group_size=1"], "train.group_size"),
        (["train.grup_size=3"], "unknown key 'train.grup_size' \\(did you mean 'group_size'"),
        (["sampler.sde_window=[0.2, 1.5]"], "sampler.sde_window"),
        (["sampler.sde_window=[-0.1, 0.5]"], "sampler.sde_window"),
        (["sampler.num_sde_steps=12"], "more than sampler.num_steps"),
        (["sampler.num_sde_steps=6"], "steps in sampler.sde_window"),
        (["algorithm=ppo"], "unknown algorithm 'ppo'"),
        (["train.lr=fast"], "train.lr"),
        (["train.lr=-1"], "train.lr"),
        (["sampler.eta=0"], "sampler.eta"),
        (["algorithm=cps", "sampler.eta=1.5"], "sampler.eta must be <= 1"),
        (["log.nonsense=1"], "unknown key 'log.nonsense'"),
        (["train.lr"], "key=value"),
        (["train=3"], "train"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))
    assert configs, "the repository ships recipes under configs/"
    for path in configs:
        if path.parent.name == "experiments":
            continue  # compare experiments: tests/test_compare.py resolves them
        assert isinstance(load_config(path), Config)


def test_task_recommendation_ranks_below_file_and_overrides(tmp_path):
    base = {"task": "shapes", "train": {"iterations": 150, "group_size": 16}}
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  group_size: 4\n")
    cfg = load_config(path, ["train.lr=1e-4"], base=base)
    assert cfg.task == "shapes" and cfg.train.iterations == 150
    assert cfg.train.group_size == 4 and cfg.train.lr == 1e-4


def test_run_name_defaults_to_algorithm_and_task():
    assert load_config(None, ["algorithm=dppo+cps", "task=shapes"]).run_name == "dppo-cps-shapes"
    assert load_config(None, ["name=mine"]).run_name == "mine"


def test_a_huge_step_count_is_checked_without_listing_every_step():
    # The fuzzer's integers reach 10**20; a list of the window's steps took all memory.
    cfg = load_config(None, [f"sampler.num_steps={10**20}"])
    assert cfg.sampler.num_steps == 10**20
    with pytest.raises(ConfigError, match="more than the 0 steps in sampler.sde_window"):
        load_config(None, ["sampler.num_steps=3", "sampler.sde_window=[0.7, 0.9]"])


def test_reward_names_without_brackets_are_a_list():
    assert load_config(None, ["reward.names=digit_prob"]).reward.names == ["digit_prob"]
    both = load_config(None, ["reward.names=digit_prob,digit_smoothness"]).reward
    assert both.names == ["digit_prob", "digit_smoothness"]


def test_an_error_from_an_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"\(override train\.lr=-1\)"):
        load_config(None, ["train.group_size=4", "train.lr=-1"])
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"\({re.escape(str(path))}\)"):
        load_config(path, ["train.group_size=4"])
    # A check across keys names the source and every override that fed it.
    with pytest.raises(ConfigError, match=r"\(defaults with overrides sampler\.num_sde_steps=40\)"):
        load_config(None, ["sampler.num_sde_steps=40"])


def test_a_tilde_in_every_path_key_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    cfg = load_config(None, ["log.run_dir=~/runs/x", "model.weights=~/w.safetensors"])
    assert cfg.log.run_dir == f"{home}/runs/x" and cfg.model.weights == f"{home}/w.safetensors"
    cfg = load_config(
        None,
        [
            "task=prompts",
            "model.kind=sd3",
            "model.path=~/sd3",
            "data.train_prompts=~/train.txt",
            "data.heldout_prompts=~/heldout.txt",
            "reward.names=[pickscore]",
        ],
    )
    assert cfg.model.path == f"{home}/sd3"
    d = cfg.data
    assert (d.train_prompts, d.heldout_prompts) == (f"{home}/train.txt", f"{home}/heldout.txt")
    # Only a leading tilde is a home directory.
    assert load_config(None, ["log.run_dir=runs/~x"]).log.run_dir == "runs/~x"
    with pytest.raises(ConfigError, match="log.run_dir.*there is no user 'no-such-user-x'"):
        load_config(None, ["log.run_dir=~no-such-user-x/runs"])
