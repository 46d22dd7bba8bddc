import json

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
    original = Trainer._checkpoint

    def crash_after_two(self):
        original(self)
        if self.iteration == 2:
            raise Crash

    monkeypatch.setattr(Trainer, "_checkpoint", crash_after_two)
    with pytest.raises(Crash):
        Trainer(cfg, tmp_path / "crashed").train()
    monkeypatch.setattr(Trainer, "_checkpoint", original)
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
