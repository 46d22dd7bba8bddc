import json
from contextlib import contextmanager

import pytest

from flowdppo.config import load_config
from flowdppo.trainer.loop import Trainer, TrainingError, metrics_of

ALGORITHMS = ["dppo", "grpo", "cps", "dppo+cps", "dppo+dance", "grpo+dance"]


def _train(tmp_path, overrides, name="run"):
    cfg = load_config(None, overrides)
    return Trainer(cfg, tmp_path / name).train(), tmp_path / name


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_iterations_of_every_algorithm(tmp_path, toy_overrides, algorithm):
    summary, run = _train(tmp_path, toy_overrides + [f"algorithm={algorithm}"])
    rows = metrics_of(run)
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:
        # The first update of every iteration replays the rollout under unchanged weights.
        assert row["first_update_ratio_dev"] < 1e-5
        assert row["grad_norm"] > 0
        key = "masked_fraction" if algorithm.startswith("dppo") else "clip_fraction"
        assert 0 <= row[key] <= 1
        assert row["kl_ref/mean"] >= 0 and row["time/update"] > 0
    assert rows[0]["kl_ref/mean"] == 0  # the first rollout is the reference model's own
    assert rows[1]["kl_ref/mean"] > 0  # after one update the policy has moved
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert (run / "grids" / "iter-000002.png").is_file()
    assert summary["before"]["eval/train/reward/mean"] >= 0
    assert "eval/heldout/kl_ref/mean" in summary["after"]


def test_full_finetuning_and_reference_penalty(tmp_path, toy_overrides):
    _, run = _train(tmp_path, toy_overrides + ["model.finetune=full", "objective.beta=0.1"])
    rows = metrics_of(run)
    assert rows[-1]["ref_penalty"] > 0 and rows[-1]["kl_ref/mean"] > 0


def test_multi_reward_gdpo_logs_each_reward(tmp_path, toy_overrides):
    _, run = _train(
        tmp_path,
        toy_overrides
        + [
            "reward.names=[toy_brightness, toy_contrast]",
            "reward.combine=gdpo",
            "train.inner_epochs=2",
        ],
    )
    row = metrics_of(run)[-1]
    assert "reward/toy_brightness/mean" in row and "reward/toy_contrast/mean" in row


class Crash(RuntimeError):
    pass


@contextmanager
def crash_after_checkpoint(monkeypatch, iteration):
    """Inside: a run raises Crash right after writing its checkpoint of ``iteration``."""
    original = Trainer._checkpoint

    def checkpoint_then_crash(self):
        original(self)
        if self.iteration == iteration:
            raise Crash

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint_then_crash)
    with pytest.raises(Crash):
        yield
    monkeypatch.setattr(Trainer, "_checkpoint", original)


def test_resume_equals_an_uninterrupted_run(tmp_path, toy_overrides, monkeypatch):
    overrides = toy_overrides + [
        "train.iterations=4",
        "log.checkpoint_every=2",
        "log.eval_every=2",
        "train.lr_schedule=cosine",
    ]
    cfg = load_config(None, overrides)
    full = Trainer(cfg, tmp_path / "full").train()

    # The same run, crashing right after its iteration-2 checkpoint, then resumed.
    with crash_after_checkpoint(monkeypatch, 2):
        Trainer(cfg, tmp_path / "crashed").train()
    resumed = Trainer(cfg, tmp_path / "crashed", resume=True).train()

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert strip(metrics_of(tmp_path / "crashed")) == strip(metrics_of(tmp_path / "full"))
    assert resumed["after"] == full["after"] and resumed["before"] == full["before"]
    digest = [
        json.loads((tmp_path / r / "ckpt-000004" / "state.json").read_text())["sha256"]
        for r in ("full", "crashed")
    ]
    assert digest[0] == digest[1]  # bit-identical weights and optimizer state


def test_new_run_refuses_a_directory_with_checkpoints(tmp_path, toy_overrides):
    _train(tmp_path, toy_overrides)
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(load_config(None, toy_overrides), tmp_path / "run")
    with pytest.raises(TrainingError, match="nothing to resume"):
        Trainer(load_config(None, toy_overrides), tmp_path / "empty", resume=True)


def test_bad_reward_is_reported(tmp_path, toy_overrides):
    # Every sample invalid: more than reward.max_invalid_fraction, so the run stops.
    with pytest.raises(TrainingError, match="8 of 8 samples have a NaN or infinite reward"):
        _train(tmp_path, toy_overrides + ["reward.names=[toy_nan]"])


def _checkpoint_digests(run):
    return json.loads((run / "ckpt-000004" / "state.json").read_text())["sha256"]


def test_a_continued_run_with_ema_resumes_bit_exact(tmp_path, toy_overrides, monkeypatch, capsys):
    """Two runs of 2 iterations (EMA on, cosine lr), each continued to 4 with
    ``--resume RUN train.iterations=4``; one crashes after its iteration-3 checkpoint and is
    resumed. Both end bit-identical, EMA included, and config.yaml records the continuation."""
    from flowdppo import cli
    from flowdppo.config import read_yaml

    overrides = toy_overrides + [
        "train.lr_schedule=cosine",
        "train.ema.decay=0.5",
        "log.eval_every=0",
        "log.keep_checkpoints=1",
    ]
    runs = [tmp_path / "whole", tmp_path / "crashed"]
    for run in runs:
        assert cli.main(["train", *overrides, f"log.run_dir={run}"]) == 0
    assert cli.main(["train", "--resume", str(runs[0]), "train.iterations=4"]) == 0
    assert "the cosine lr schedule now spans 4 iterations, so the lr resumes at 0.5 x" in (
        capsys.readouterr().err
    )

    with crash_after_checkpoint(monkeypatch, 3):
        cli.main(["train", "--resume", str(runs[1]), "train.iterations=4"])
    assert cli.main(["train", "--resume", str(runs[1])]) == 0  # config.yaml says 4 now

    rows = [metrics_of(run) for run in runs]
    strip = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in x] for x in rows]
    assert strip[0] == strip[1] and [r["iteration"] for r in rows[0]] == [1, 2, 3, 4]
    digests = [_checkpoint_digests(run) for run in runs]
    assert "ema.safetensors" in digests[0] and digests[0] == digests[1]
    # The cosine schedule is laid out again over 4 iterations: after its end at iteration
    # 2 (lr near 0) it restarts from the longer schedule's value at iteration 2 of 4.
    lrs = [r["lr"] for r in rows[0]]
    assert lrs[1] < 0.2e-2 < lrs[2] and lrs[3] < lrs[2]
    for run in runs:
        cfg = read_yaml(run / "config.yaml")
        assert cfg["train"]["iterations"] == 4
        assert [
            (h["at_iteration"], h["iterations_before"], h["iterations_after"])
            for h in cfg["history"]
        ] == [(2, 2, 4)]


def test_ema_is_kept_in_checkpoints_and_used_for_evaluation(tmp_path, toy_overrides):
    import torch

    from flowdppo.runs import load_run
    from flowdppo.trainer import checkpoint as ckpt

    cfg = load_config(None, toy_overrides + ["train.ema.decay=0.5", "train.ema.every=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    summary = trainer.train()
    average = ckpt.load_ema(tmp_path / "run" / "ckpt-000002")
    assert set(average) == set(trainer.ema.average)
    assert all(torch.equal(average[k], v) for k, v in trainer.ema.average.items())
    split = trainer.task.eval_split()
    with trainer.ema.applied():
        assert trainer.evaluator.run(*split) == summary["after"]
    raw = trainer.evaluator.run(*split)
    assert raw["eval/train/reward/mean"] != summary["after"]["eval/train/reward/mean"]
    # sample / eval / export-lora load the EMA unless asked for the raw weights.
    _, _, ema_model, _ = load_run(tmp_path / "run")
    _, _, raw_model, _ = load_run(tmp_path / "run", raw_weights=True)
    ema_params = dict(ema_model.module.named_parameters())
    raw_params = dict(raw_model.module.named_parameters())
    trained = dict(trainer.model.module.named_parameters())
    for name, value in average.items():
        assert torch.equal(ema_params[name], value)
        assert torch.equal(raw_params[name], trained[name])
        assert not torch.equal(value, trained[name]) or "lora_B" not in name


def test_continuing_a_constant_lr_run_is_the_run_that_asked_for_more(tmp_path, toy_overrides):
    from flowdppo import cli

    short, long = tmp_path / "short", tmp_path / "long"
    assert cli.main(["train", *toy_overrides, f"log.run_dir={short}"]) == 0
    assert cli.main(["train", "--resume", str(short), "train.iterations=4"]) == 0
    assert cli.main(["train", *toy_overrides, "train.iterations=4", f"log.run_dir={long}"]) == 0

    def training(run):  # the short run also evaluated at its old end, iteration 2
        skip = ("time/", "eval/", "forward_")
        return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in metrics_of(run)]

    assert training(short) == training(long)
    assert _checkpoint_digests(short) == _checkpoint_digests(long)


class _Reader:
    """A reward that also says what it saw (as ``ocr`` says what it read)."""

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))

    def annotate(self, images, prompts):
        return [f"{p[0]}{i}" for i, p in enumerate(prompts)]


def test_eval_groups_first_prompts_and_grid_notes(tmp_path, toy_overrides, monkeypatch):
    from flowdppo import tasks
    from flowdppo.rewards import register_reward
    from flowdppo.trainer.media import render_pages

    register_reward("toy_reader")(_Reader)
    base = tasks._TASKS["toy"]

    def grouped():
        task = base()
        task.extra["eval_group"] = lambda p: "b" if p.startswith("b") else "other"
        return task

    monkeypatch.setitem(tasks._TASKS, "toy", grouped)
    notes = []
    original = render_pages

    def spy(*args, **kw):
        notes.append(kw.get("notes"))
        return original(*args, **kw)

    monkeypatch.setattr("flowdppo.trainer.media.render_pages", spy)
    summary, run = _train(
        tmp_path,
        toy_overrides + ["train.iterations=1", "reward.names=[toy_reader]", "log.eval_prompts=1"],
    )
    after = summary["after"]
    # one group per prompt of the split: log.eval_prompts=1 keeps "bright" and "grey" only
    assert set(k for k in after if "/group/" in k) == {
        "eval/train/group/b/reward",
        "eval/heldout/group/other/reward",
    }
    assert after["eval/train/group/b/reward"] == after["eval/train/reward/mean"]
    # 4 samples of "bright", then 4 of "grey", each with the reward's note
    assert notes[-1] == ["b0", "b1", "b2", "b3", "g0", "g1", "g2", "g3"]
    with pytest.raises(ValueError, match="data.eval_prompts"):
        load_config(None, ["task=prompts", "log.eval_prompts=2"])
