"""The command line: argument handling, and the commands on one finished toy run."""

import json
import logging
import os
import warnings
from pathlib import Path

import pytest

from flowdppo import cli
from flowdppo.trainer.loop import Trainer


class _Stop(Exception):
    pass


def _train_config(monkeypatch, args: list[str]):
    """The config `flowdppo train ARGS` hands the trainer (which then stops)."""
    seen = {}

    def fake_init(self, cfg, run_dir, resume=False):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(Trainer, "__init__", fake_init)
    with pytest.raises(_Stop):
        cli.main(["train", *args])
    return seen["cfg"]


def test_train_task_flag_applies_the_tasks_recommended_budget(tmp_path, monkeypatch):
    args = ["--task", "shapes", "train.group_size=4", f"log.run_dir={tmp_path}"]
    cfg = _train_config(monkeypatch, args)
    assert cfg.task == "shapes" and cfg.run_name == "dppo-shapes"
    assert cfg.train.iterations == 150  # the shapes recommendation
    assert cfg.train.group_size == 4  # the command line wins


@pytest.mark.parametrize("task", ["text", "shapes"])
@pytest.mark.parametrize(
    "algorithm, fast", [("dppo", True), ("grpo", True), ("cps", True), ("nft", False)]
)
def test_task_recommends_the_fast_rollout_to_sde_methods_only(
    tmp_path, monkeypatch, task, algorithm, fast
):
    args = ["--task", task, f"algorithm={algorithm}", f"log.run_dir={tmp_path}"]
    cfg = _train_config(monkeypatch, args)
    s, lg = cfg.sampler, cfg.log
    # The plain recommendation applies to all.
    assert cfg.train.iterations == {"text": 40, "shapes": 150}[task]
    if fast:  # dpm2 on a coarse grid, shared prefixes, folded LoRA, evaluated with Euler
        assert (s.solver, s.ode_stride, s.shared_prefix, s.merge_lora, lg.eval_solver) == (
            "dpm2",
            2,
            True,
            True,
            "euler",
        )
        assert cfg.train.fuse_steps
    else:  # an ODE-kernel method cannot branch at an SDE step: its own rollout, as before
        assert not s.shared_prefix and s.ode_stride == 1 and lg.eval_solver is None
        assert not s.merge_lora and not cfg.train.fuse_steps
    # The command line still wins over the recommendation.
    cfg = _train_config(monkeypatch, args + ["sampler.shared_prefix=false", "sampler.ode_stride=1"])
    assert not cfg.sampler.shared_prefix and cfg.sampler.ode_stride == 1


@pytest.mark.parametrize(
    "task, recipes", [("text", ["dppo", "grpo"]), ("shapes", ["dppo", "grpo", "dppo_multi"])]
)
def test_task_recipes_match_the_tasks_recommendation(task, recipes):
    from flowdppo.config import load_config
    from flowdppo.tasks import get_task

    extra = get_task(task).extra
    for name in recipes:
        recipe = load_config(f"{task}/{name}")
        flag = load_config(
            None,
            [f"algorithm={recipe.algorithm}", f"task={task}"],
            base=extra["recommended"],
            sde_base=extra["recommended_sde"],
        )
        assert recipe.sampler == flag.sampler and recipe.train == flag.train
        assert recipe.log == flag.log


def test_unknown_task_is_a_clear_error(capsys):
    assert cli.main(["train", "--task", "nope"]) == 2
    assert "unknown task 'nope'; available: digits, motion, shapes" in capsys.readouterr().err


def test_resume_takes_no_other_arguments(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path), "--task", "shapes"]) == 2
    assert "drop the other arguments" in capsys.readouterr().err


# ---------------------------------------------------------------- with a finished toy run
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, one_thread):
    """A finished 2-iteration toy run (LoRA, EMA on) and its summary."""
    from conftest import TOY

    from flowdppo.config import load_config

    run = tmp_path_factory.mktemp("cli") / "run"
    summary = Trainer(load_config(None, TOY + ["train.ema.decay=0.5"]), run).train()
    return run, summary


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["sample", "--task", "toy", "--prompts", "bright", "-n", "0"], "-n must be at least 1"),
        (["sample", "--task", "toy", "--prompts", "bright", "--steps", "0"], "--steps must be"),
        (["sample", "--task", "toy", "--prompts", "bright", "--guidance", "0.5"], "--guidance"),
        (["sample", "--task", "toy", "--prompts", " , "], "--prompts names no prompt"),
        (["sample", "--task", "toy", "--prompts", "bright", "--out", "DIR"], "is not a file name"),
        (["eval", "RUN", "-n", "0"], "-n must be at least 1"),
        (["eval", "RUN", "--steps", "4,0"], "--steps must be at least 1"),
        (["eval", "RUN", "--steps", "4,x"], "--steps takes step counts"),
    ],
)
def test_sample_and_eval_options_are_one_error_line(toy_run, tmp_path, capsys, argv, match):
    run, _ = toy_run
    argv = [str(run) if a == "RUN" else a for a in argv]
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(tmp_path)
    else:
        argv += ["--out", str(tmp_path / "out.png")]
    assert cli.main(argv) == 2
    assert match in _one_error_line(capsys)
    assert not list(tmp_path.iterdir())  # nothing written


def test_eval_steps_writes_the_inference_cost_table(toy_run, capsys):
    run, summary = toy_run
    # 6 steps and 4 samples per prompt are the run's own: its evaluation, reproduced.
    assert cli.main(["eval", str(run), "--steps", "2,6", "-n", "4"]) == 0
    out = capsys.readouterr().out
    assert "inference cost" in out and "ms/image" in out and "merged" in out
    head = next(line for line in out.splitlines() if "ms/image" in line).split()
    assert head[4:6] == ["trained", "held-out"]  # the splits apart, never averaged together
    rows = json.loads((run / "inference_cost.json").read_text())["rows"]
    keys = {"model", "steps", "nfe", "reward_mean", "ms_per_image", "lora", "solver"}
    assert all(set(r) == keys | {"reward_trained", "reward_heldout"} for r in rows)
    # Each split's mean is its own: the mean over both lies between them, weighted by
    # the toy task's 2 trained and 1 held-out prompts.
    for r in rows:
        both = (2 * r["reward_trained"] + r["reward_heldout"]) / 3
        assert r["reward_mean"] == pytest.approx(both, abs=1e-6)
    base, trained = (
        next(r for r in rows if r["model"] == m and r["steps"] == 6) for m in ("base", "trained")
    )
    for row, when in ((base, "before"), (trained, "after")):
        for split in ("trained", "heldout"):
            key = f"eval/{'train' if split == 'trained' else split}/reward/mean"
            assert row[f"reward_{split}"] == pytest.approx(summary[when][key], abs=1e-6)
    line = next(x.split() for x in out.splitlines() if x.split()[:4] == ["base", "-", "6", "6"])
    assert line[4:6] == [f"{base['reward_trained']:.4f}", f"{base['reward_heldout']:.4f}"]
    # The toy model has LoRA: the base, and the trained model unmerged and merged.
    assert [(r["model"], r["lora"], r["steps"]) for r in rows] == [
        (m, lora, s)
        for m, lora in (("base", None), ("trained", "unmerged"), ("trained", "merged"))
        for s in (2, 6)
    ]
    for r in rows:
        assert r["nfe"] == r["steps"]  # no guidance: one evaluation per step
        assert 0 <= r["reward_mean"] <= 1 and isinstance(r["ms_per_image"], float)
    unmerged, merged = rows[2:4], rows[4:6]
    for a, b in zip(unmerged, merged, strict=True):
        for key in ("reward_trained", "reward_heldout"):
            assert a[key] == pytest.approx(b[key], abs=1e-5)


def test_sample_and_eval_take_the_ode_solver(toy_run, tmp_path, capsys):
    run, _ = toy_run
    out = tmp_path / "dpm2.png"
    argv = ["sample", "--task", "toy", "--prompts", "bright", "-n", "2", "--solver", "dpm2"]
    assert cli.main([*argv, "--out", str(out)]) == 0 and out.is_file()
    assert cli.main(["eval", str(run), "--steps", "4", "-n", "2", "--solver", "dpm2"]) == 0
    assert "dpm2 solver" in capsys.readouterr().out
    rows = json.loads((run / "inference_cost.json").read_text())["rows"]
    assert {r["solver"] for r in rows} == {"dpm2"}
    with pytest.raises(SystemExit):  # argparse: the choices, one usage error
        cli.main(["sample", "--task", "toy", "--prompts", "bright", "--solver", "rk4"])
    assert "invalid choice: 'rk4'" in capsys.readouterr().err
    help_text = cli._parser()._subparsers._group_actions[0].choices["sample"].format_help()
    assert "--solver {euler,dpm2}" in help_text and "DPM-Solver++" in help_text


def test_resuming_a_finished_run_says_so_and_changes_nothing(toy_run, capsys):
    run, _ = toy_run
    before = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "summary.json")}
    assert cli.main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "is finished (2 of 2 iterations); nothing to do" in out
    assert "train.iterations=N with N > 2" in out
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.lr=0.1", "train.lr cannot change on resume; the only key that can is "),
        ("sampler.num_steps=4", "sampler.num_steps cannot change on resume"),
        ("train.iterations=1", "less than the run's own budget of 2"),
        ("train.iterations=x", "override train.iterations=x"),
    ],
)
def test_resume_refuses_every_override_but_a_longer_budget(toy_run, capsys, override, match):
    run, _ = toy_run
    config = (run / "config.yaml").read_text()
    assert cli.main(["train", "--resume", str(run), override]) == 2
    err = capsys.readouterr().err  # a config error: a head line, then one per bad key
    assert err.startswith("error: ") and match in err and "Traceback" not in err
    assert (run / "config.yaml").read_text() == config


def test_summary_names_only_the_logs_it_wrote(toy_run, capsys):
    from flowdppo.config import load_config
    from flowdppo.runs import run_config

    run, summary = toy_run
    cli._print_summary(summary, run_config(run))  # log.tensorboard=false
    logs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("logs:")]
    assert logs and "tensorboard" not in logs[0] and "metrics.jsonl" in logs[0]
    cli._print_summary(summary, load_config())
    assert f"{run}/tensorboard" in capsys.readouterr().out


def test_pretrain_never_overwrites_the_installed_assets_by_default(tmp_path, monkeypatch):
    import flowdppo.tasks.digits as digits
    from flowdppo.tasks.common import assets_dir

    calls = []
    monkeypatch.setattr(digits, "pretrain", lambda out, seed: calls.append(Path(out)))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pretrain", "--task", "digits"]) == 0
    assert cli.main(["pretrain", "--task", "digits", "--out", str(assets_dir())]) == 0
    assert calls == [Path("pretrained/digits"), assets_dir()]


def test_third_party_warnings_and_logs_are_quiet_unless_verbose(monkeypatch):
    from flowdppo import verbosity

    for key in verbosity._ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    levels = {n: logging.getLogger(n).level for n in verbosity.LIBRARIES}
    shown = {}
    try:
        for flag in (["--verbose"], []):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cli.main(["sample", "--task", "toy", "--prompts", "bright", "-n", "0", *flag])
                for module in ("transformers.modeling_utils", "flowdppo.cli"):
                    warnings.warn_explicit("note", FutureWarning, "x.py", 1, module=module)
            shown[bool(flag)] = sorted(str(w.filename) for w in caught)
            if flag:
                assert "TRANSFORMERS_VERBOSITY" not in os.environ
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert logging.getLogger("diffusers").level == logging.ERROR
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        verbosity.set_verbose(True)
    assert len(shown[True]) == 2 and len(shown[False]) == 1  # only flowdppo's own warning


# ---------------------------------------------------------------- recipes, fast answers
def test_version_and_the_missing_equals_sign(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("flowdppo 0.")
    assert cli.main(["train", "train.iterations", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "write train.iterations=VALUE" in err


def test_recipes_are_found_by_name_and_print_with_every_key_explained(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # no clone here: the package's own recipes
    assert cli.main(["recipes"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("sd3/grpo ") for line in listed)
    assert any(line.startswith("experiments/table_digits ") for line in listed)
    assert cli.main(["train", "sd3/grpo", "train.lr=2e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "algorithm: grpo  # " in out and "  lr: 0.0002" in out
    assert "  num_steps: 10  # denoising steps per sample" in out
    # The docs' form, configs/..., is the same recipe from anywhere.
    assert cli.main(["train", "configs/sd3/grpo.yaml", "train.lr=2e-4", "--print-config"]) == 0
    assert capsys.readouterr().out == out
    assert cli.main(["train", "sd3/grpoo"]) == 2
    assert "did you mean the recipe 'sd3/grpo'" in capsys.readouterr().err
    assert cli.main(["train", "experiments/table_digits"]) == 2
    assert "run it with `flowdppo compare" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_built_wheel_carries_the_recipes(tmp_path):
    """A non-editable install's view: the wheel built from the project holds every recipe,
    and, unpacked alone, finds one by name from another directory."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "project"  # build from a copy: nothing is written into the checkout
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(tmp_path / "dist"), str(src)], check=True)
    (wheel,) = (tmp_path / "dist").glob("flowdppo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("flowdppo/recipes/") and n.endswith(".yaml")}
    ours = {
        f"flowdppo/recipes/{p.relative_to(root / 'src/flowdppo/recipes').as_posix()}"
        for p in (root / "src/flowdppo/recipes").rglob("*.yaml")
    }
    assert shipped == ours and "flowdppo/recipes/sd3/grpo.yaml" in shipped
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "flowdppo", "train", "sd3/nft", "--print-config"],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "algorithm: nft" in done.stdout and "rollout_model: old" in done.stdout
    probe = [sys.executable, "-c", "import flowdppo; print(flowdppo.__file__)"]
    where = subprocess.run(
        probe, cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True
    )
    assert where.stdout.decode().startswith(str(site))  # the wheel's copy, not the checkout's


def test_train_writes_nothing_in_the_working_directory_but_runs(
    tmp_path, monkeypatch, toy_overrides, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)
    assert cli.main(["train", *toy_overrides, "log.tensorboard=true"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "summary.json").is_file()
    # Piped output: a line as each slow start-up phase begins, in order, then one line per
    # iteration with the elapsed time and the ETA.
    lines = capsys.readouterr().out.splitlines()
    starts = [
        "flowdppo: building the reward",
        "flowdppo: loading the toy base model",
        "flowdppo: dppo on toy",
        "flowdppo: evaluating the base model; prompts: 2 trained, 1 held-out, 4 samples each",
        "flowdppo: iteration 1: the first rollouts",
        "iter 1/2 ",
        "iter 2/2 ",
    ]
    found = [next(i for i, x in enumerate(lines) if x.startswith(s)) for s in starts]
    assert found == sorted(found)
    assert lines[found[-1]].split()[-4::2] == ["elapsed", "eta"]
    assert lines[found[-1]].endswith("eta 0:00")  # the last iteration: nothing left
    from flowdppo import verbosity

    verbosity.phase("not a command's")  # the command is over: library use prints nothing
    assert capsys.readouterr().out == ""


def test_eval_prints_the_train_table_and_json_on_request(toy_run, capsys):
    run, _ = toy_run
    summary = json.loads((run / "summary.json").read_text())
    assert cli.main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    trained, heldout = out.index("trained prompts"), out.index("held-out prompts")
    assert trained < heldout  # trained and held-out apart, never averaged together
    line = next(x for x in out.splitlines() if "eval/heldout/reward/mean" in x)
    base = summary["before"]["eval/heldout/reward/mean"]
    assert line.split()[1] == f"{base:.4f}" and "->" in line  # before: the base model
    assert cli.main(["eval", str(run), "-n", "1"]) == 0  # another sample count: no base
    out = capsys.readouterr().out
    assert next(x for x in out.splitlines() if "eval/heldout/reward/mean" in x).split()[1] == "-"
    assert cli.main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["iteration"] == 2 and "eval/heldout/reward/mean" in metrics
