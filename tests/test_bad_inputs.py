"""Bad inputs and failures during a run: each ends in a clear error or a documented policy.

Rewards that return NaN / inf / the wrong shape or raise, non-finite gradients, missing or
corrupt checkpoints and weights, a run directory that cannot be written, a full disk.
Runs use the toy task of ``conftest.py``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

import pytest
import torch
from conftest import _brightness

from flowdppo import cli
from flowdppo.config import load_config
from flowdppo.rewards import _FACTORIES, register_reward
from flowdppo.trainer import checkpoint as ckpt
from flowdppo.trainer import guards, loop
from flowdppo.trainer.loop import Trainer, TrainingError, metrics_of
from flowdppo.trainer.runlog import RunLog


def _register(name, fn):
    if name not in _FACTORIES:
        register_reward(name)(lambda: fn)


def _run(tmp_path, overrides, name="run"):
    return Trainer(load_config(None, overrides), tmp_path / name).train(), tmp_path / name


def _strip_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


# ---------------------------------------------------------------- rewards
def _poisoned(bad: dict[int, float]):
    def reward(images, prompts):
        r = _brightness(images, prompts)
        for i, v in bad.items():
            if i < len(r):  # evaluation batches can be smaller
                r[i] = v
        return r

    return reward


def test_nan_and_inf_rewards_are_excluded_and_counted(tmp_path, toy_overrides):
    _register("toy_two_bad", _poisoned({0: float("nan"), 5: float("inf")}))
    _, run = _run(tmp_path, toy_overrides + ["reward.names=[toy_two_bad]"])
    rows = metrics_of(run)
    assert [r["reward/excluded"] for r in rows] == [2, 2]  # 2 of 8 = the default 0.25
    for r in rows:
        assert r["reward/mean"] is not None and 0 <= r["reward/mean"] <= 1
        assert r["grad_norm"] > 0 and r["train/skipped_steps"] == 0
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))[1]
    assert all(torch.isfinite(t).all() for t in state.values())
    # Evaluation leaves the invalid samples out of its means too, and counts them.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval/train/reward/excluded"] == 2
    assert summary["after"]["eval/train/reward/mean"] >= 0


def test_excluded_samples_get_zero_advantage_and_leave_group_stats():
    rewards = {"r": torch.tensor([1.0, float("nan"), 3.0, 0.0, 4.0, float("inf")])}
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    valid = torch.isfinite(rewards["r"])
    adv = guards.valid_advantages(rewards, group, valid, std="group")
    # Group 0 is {1, 3}, group 1 is {0, 4}: each valid sample is one std from its mean.
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0, -1.0, 1.0, 0.0], abs=1e-6)


def test_too_many_invalid_rewards_abort_unless_allowed(tmp_path, toy_overrides):
    _register("toy_three_bad", _poisoned({0: float("nan"), 1: float("nan"), 2: float("-inf")}))
    bad = toy_overrides + ["reward.names=[toy_three_bad]"]
    with pytest.raises(TrainingError, match="3 of 8 samples .*'toy_three_bad': 3.*max_invalid"):
        _run(tmp_path, bad)
    _, run = _run(tmp_path, bad + ["reward.max_invalid_fraction=0.5"], name="allowed")
    assert [r["reward/excluded"] for r in metrics_of(run)] == [3, 3]


@pytest.mark.parametrize(
    "name,fn,match",
    [
        (
            "toy_short",
            lambda images, prompts: torch.zeros(len(prompts) - 1),
            r"'toy_short' returned shape \(7,\) \(7 values\) for 8 samples",
        ),
        (
            "toy_wide",
            lambda images, prompts: torch.zeros(len(prompts), 2),
            r"'toy_wide' returned shape \(8, 2\) \(16 values\) for 8 samples",
        ),
        (
            "toy_words",
            lambda images, prompts: ["good"] * len(prompts),
            "'toy_words' returned list, not numbers",
        ),
        (
            "toy_raises",
            lambda images, prompts: 1 / 0,
            "reward 'toy_raises' raised ZeroDivisionError: division by zero",
        ),
    ],
)
def test_broken_reward_stops_the_run_naming_it(tmp_path, toy_overrides, capsys, name, fn, match):
    _register(name, fn)
    with pytest.raises(TrainingError, match=match):
        _run(tmp_path, toy_overrides + [f"reward.names=[{name}]"])
    # The command line shows the same message as one error line, exit status 2.
    code = cli.main(
        ["train", *toy_overrides, f"reward.names=[{name}]", f"log.run_dir={tmp_path / 'cli'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert name in err


# ---------------------------------------------------------------- non-finite gradients
def _poison_steps(monkeypatch, calls: set[int] | None):
    """Make the step terms numbered in ``calls`` (1-based, in the order the update scores
    them; None: all) NaN."""
    original = loop.steps_loss
    count = [0]

    def poisoned(*args, **kwargs):
        out = []
        for loss, stats in original(*args, **kwargs):
            count[0] += 1
            if calls is None or count[0] in calls:
                loss = loss * float("nan")
            out.append((loss, stats))
        return out

    monkeypatch.setattr(loop, "steps_loss", poisoned)


def test_non_finite_step_is_skipped_and_reported(tmp_path, toy_overrides, monkeypatch):
    # 8 samples, minibatches of 4, 2 SDE steps: step terms 5-6 are iteration 2's first
    # optimizer step.
    _poison_steps(monkeypatch, {5})
    trainer = Trainer(load_config(None, toy_overrides), tmp_path / "run")
    trainer.train()
    rows = metrics_of(tmp_path / "run")
    assert [r["train/skipped_steps"] for r in rows] == [0, 1]
    assert trainer.optimizer_steps == 3 and trainer.skipped_in_a_row == 0
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {3}  # the skipped step did not touch the Adam moments
    assert all(torch.isfinite(p).all() for p in trainer.params)
    assert rows[1]["grad_norm"] > 0  # the mean of the steps that were taken


def test_too_many_skipped_steps_in_a_row_abort(tmp_path, toy_overrides, monkeypatch):
    _poison_steps(monkeypatch, None)
    with pytest.raises(
        TrainingError, match="3 optimizer steps in a row .* train.max_skipped_steps = 2"
    ):
        _run(tmp_path, toy_overrides + ["train.max_skipped_steps=2"])
    # Iteration 1 (two skipped steps) was logged and checkpointed before the abort.
    run = tmp_path / "run"
    assert [r["train/skipped_steps"] for r in metrics_of(run)] == [2]
    assert ckpt.latest_checkpoint(run).name == "ckpt-000001"
    ckpt.load_checkpoint(run / "ckpt-000001")
    with pytest.raises(TrainingError, match="1 optimizer steps in a row"):
        _run(tmp_path, toy_overrides + ["train.max_skipped_steps=0"], name="strict")


# ---------------------------------------------------------------- checkpoints
@pytest.fixture
def finished_run(tmp_path, toy_overrides):
    """A 3-iteration toy run keeping ckpt-2 and ckpt-3, and its metrics."""
    overrides = toy_overrides + ["train.iterations=3"]
    _, run = _run(tmp_path, overrides, name="finished")
    return run, overrides


def _resume(run, overrides):
    return Trainer(load_config(None, overrides), run, resume=True)


def _rewrite_state(path, edit):
    payload = json.loads((path / "state.json").read_text())
    edit(payload)
    (path / "state.json").write_text(json.dumps(payload))


@pytest.mark.parametrize(
    "damage,match",
    [
        (
            lambda p: os.truncate(p / "model.safetensors", 40),
            "model.safetensors is missing or corr",
        ),
        (lambda p: (p / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
        (lambda p: (p / "state.json").unlink(), "no readable state.json"),
        (lambda p: (p / "state.json").write_text('{"iteration": 3'), "no readable state.json"),
        (lambda p: _rewrite_state(p, lambda s: s.pop("sha256")), r"lacks \['sha256'\]"),
    ],
)
def test_corrupt_latest_checkpoint_names_the_file_and_the_good_one(
    finished_run, capsys, damage, match
):
    run, overrides = finished_run
    damage(run / "ckpt-000003")
    with pytest.raises(ckpt.CheckpointError, match=match) as err:
        _resume(run, overrides)
    assert "newest checkpoint that verifies is ckpt-000002" in str(err.value)
    assert cli.main(["train", "--resume", str(run)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot resume: checkpoint")
    # The earlier checkpoint and the log are untouched and load.
    ckpt.load_checkpoint(run / "ckpt-000002")
    assert [r["iteration"] for r in metrics_of(run)] == [1, 2, 3]


def test_a_flipped_byte_is_caught_by_the_checksum(finished_run):
    run, overrides = finished_run
    path = run / "ckpt-000003" / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: safetensors alone would load it
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        _resume(run, overrides)


def test_following_the_hint_resumes_from_the_good_checkpoint(finished_run, tmp_path):
    run, overrides = finished_run
    os.truncate(run / "ckpt-000003" / "model.safetensors", 10)
    shutil.move(run / "ckpt-000003", tmp_path / "broken")
    (run / "latest").write_text("ckpt-000002\n")
    # Redo iteration 3 from ckpt-2: the same metrics as the first time.
    before = _strip_time(metrics_of(run))
    _resume(run, overrides).train()
    assert _strip_time(metrics_of(run)) == before


def test_checkpoint_with_other_tensors_is_refused(finished_run):
    run, overrides = finished_run
    path = run / "ckpt-000003"
    from safetensors.torch import save_file

    save_file({"some.other.weight": torch.zeros(3)}, path / "model.safetensors")
    digest = ckpt._sha256(path / "model.safetensors")  # a consistent, but foreign, checkpoint
    _rewrite_state(path, lambda s: s["sha256"].update({"model.safetensors": digest}))
    with pytest.raises(TrainingError, match="does not match this model's trainable parameters"):
        _resume(run, overrides)


def test_missing_run_dir_and_checkpointless_run(tmp_path, toy_overrides, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="nothing to resume"):
        Trainer(load_config(None, toy_overrides), tmp_path / "empty", resume=True)


@pytest.mark.parametrize("kind", ["missing", "truncated", "wrong keys"])
def test_bad_model_weights_fail_before_any_work(tmp_path, capsys, kind):
    from safetensors.torch import save_file

    from flowdppo.tasks.digits.model import BASE_WEIGHTS, assets_dir

    weights = tmp_path / "weights.safetensors"
    if kind == "truncated":
        weights.write_bytes((assets_dir() / BASE_WEIGHTS).read_bytes()[:1000])
    elif kind == "wrong keys":
        save_file({"not.a.layer": torch.zeros(2)}, weights)
    run = tmp_path / "run"
    code = cli.main(["train", f"model.weights={weights}", f"log.run_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: digits base model weights")
    assert str(weights) in err and "flowdppo pretrain --task digits" in err
    assert not run.exists()  # nothing was started


# ---------------------------------------------------------------- the run directory and disk
def test_run_dir_that_cannot_be_created(tmp_path, toy_overrides):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TrainingError, match="is not writable"):
        Trainer(load_config(None, toy_overrides), blocker / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_dir(tmp_path, toy_overrides):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    try:
        with pytest.raises(TrainingError, match="is not writable"):
            Trainer(load_config(None, toy_overrides), run)
    finally:
        run.chmod(0o700)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_checkpointing(tmp_path, toy_overrides, monkeypatch):
    overrides = toy_overrides + ["train.iterations=3"]
    _, ref = _run(tmp_path, overrides, name="reference")
    original = ckpt.save_file
    calls = [0]

    def fill_up(tensors, path):
        calls[0] += 1
        if calls[0] == 4:  # iteration 2's second tensor file
            _enospc()
        return original(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", fill_up)
    run = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointError) as err:
        _run(tmp_path, overrides)
    msg = str(err.value)
    assert "could not write checkpoint" in msg and "No space left on device" in msg
    assert "ckpt-000001, is intact" in msg and f"--resume {run}" in msg
    assert not list(run.glob(".ckpt-*"))  # the partial write was removed
    assert (run / "latest").read_text().strip() == "ckpt-000001"
    ckpt.load_checkpoint(run / "ckpt-000001")
    assert [r["iteration"] for r in metrics_of(run)] == [1, 2]

    # Space is back: resuming loses nothing against a run that never failed.
    monkeypatch.setattr(ckpt, "save_file", original)
    _resume(run, overrides).train()
    assert _strip_time(metrics_of(run)) == _strip_time(metrics_of(ref))
    for name in ("ckpt-000002", "ckpt-000003"):
        assert (
            ckpt.verify_checkpoint(run / name)["sha256"]
            == (ckpt.verify_checkpoint(ref / name)["sha256"])
        )


def test_full_disk_while_logging(tmp_path, toy_overrides, monkeypatch):
    original = RunLog.log

    def log(self, iteration, metrics):
        if iteration == 2:
            _enospc()
        return original(self, iteration, metrics)

    monkeypatch.setattr(RunLog, "log", log)
    with pytest.raises(TrainingError, match="could not append to .*metrics.jsonl.*No space left"):
        _run(tmp_path, toy_overrides)
    run = tmp_path / "run"
    assert [r["iteration"] for r in metrics_of(run)] == [1]
    assert ckpt.latest_checkpoint(run).name == "ckpt-000001"
    ckpt.load_checkpoint(run / "ckpt-000001")


# ---------------------------------------------------------------- kills before a checkpoint
def test_metrics_cut_by_a_kill_are_trimmed_to_the_checkpoint(tmp_path):
    from flowdppo.trainer.runlog import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "a": 1}\n{"iteration": 2, "a": 2}\n{"iteration": 3, "a"')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"iteration": 1, "a": 1}\n{"iteration": 2, "a": 2}\n'
    truncate_metrics(path, 1)
    assert path.read_text() == '{"iteration": 1, "a": 1}\n'


class Crash(RuntimeError):
    pass


def test_a_run_killed_before_its_first_checkpoint_can_start_again(
    tmp_path, toy_overrides, monkeypatch
):
    _, ref = _run(tmp_path, toy_overrides, name="reference")
    original = Trainer._checkpoint

    def crash(self):
        raise Crash

    monkeypatch.setattr(Trainer, "_checkpoint", crash)
    with pytest.raises(Crash):
        _run(tmp_path, toy_overrides)
    run = tmp_path / "run"
    assert len(metrics_of(run)) == 1 and ckpt.latest_checkpoint(run) is None
    with pytest.raises(TrainingError, match="nothing to resume"):
        _resume(run, toy_overrides)
    monkeypatch.setattr(Trainer, "_checkpoint", original)
    _run(tmp_path, toy_overrides)  # the same directory, from the start
    assert _strip_time(metrics_of(run)) == _strip_time(metrics_of(ref))


# ---------------------------------------------------------------- inputs caught before work
def test_a_batch_that_cannot_fit_in_memory_is_refused_before_work(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(["train", "train.group_size=1000000000", f"log.run_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "train.group_size" in err and "8000000000 samples" in err
    assert " TB for the rollout's latents" in err and "memory" in err
    assert not run.exists()


@pytest.mark.parametrize(
    "content,match",
    [
        ("train:\n  lr: 0.001\n".encode("utf-16"), "is UTF-16 .* text; flowdppo reads UTF-8"),
        ("train:\n  lr: 0.001\n".encode("utf-32"), "is UTF-32 .* text"),
        ("train:\n  lr: 0.001\n".encode("utf-16-le"), "holds NUL bytes: it is UTF-16"),
        ("name: caf\xe9\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset 9\)"),
        (b"", r"is empty \(no keys\); to run the defaults give no config file"),
        (b"# only a comment\n", "is empty"),
        (None, "is a directory, not a YAML file"),
    ],
)
def test_config_files_that_are_not_utf8_yaml_name_the_file(tmp_path, capsys, content, match):
    path = tmp_path / "c.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    run = tmp_path / "run"
    assert cli.main(["train", str(path), f"log.run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file '{path}' ") and err.count("\n") == 1
    assert re.search(match, err), err
    assert not run.exists()


def test_a_utf8_byte_order_mark_and_an_explicit_empty_mapping_are_fine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("\ufefftrain:\n  lr: 0.002\n".encode())
    assert load_config(path).train.lr == 0.002
    path.write_text("{}\n")
    assert load_config(path).train.lr == load_config().train.lr


def test_an_edited_config_that_changes_tensor_shapes_names_the_key(finished_run, capsys):
    run, _ = finished_run
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lora_rank: 8", "lora_rank: 4"))
    before = (run / "metrics.jsonl").read_text()
    assert cli.main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and err.count("\n") == 1
    assert "differ in shape" in err and "[8, " in err and "[4, " in err
    assert "model.lora_rank: 8 -> 4" in err and "Set those keys back" in err
    assert (run / "metrics.jsonl").read_text() == before  # nothing was touched
    for p in ckpt.list_checkpoints(run):
        ckpt.verify_checkpoint(p)


@pytest.mark.parametrize("pointer", [b"ckpt-000009\n", b"garbage\n", b"\xff\xfe"])
def test_a_broken_latest_pointer_is_reported_with_the_fallback(finished_run, capsys, pointer):
    run, _ = finished_run
    (run / "latest").write_bytes(pointer)
    assert cli.main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert str(run / "latest") in warning
    assert "using ckpt-000003, the newest checkpoint in" in warning


# ---------------------------------------------------------------- a continued run
REQUEUE = '[ -f "$RUN/summary.json" ] || echo requeue'  # docs/RELIABILITY.md's recipes


def _recipe_requeues(run) -> bool:
    import subprocess

    out = subprocess.run(["bash", "-c", REQUEUE], env={"RUN": str(run)}, capture_output=True)
    return out.stdout.decode().strip() == "requeue"


def test_a_continued_run_stopped_before_its_end_is_not_finished(
    tmp_path, toy_overrides, monkeypatch, capsys
):
    """A 2-iteration run continued to 4 and killed after its last checkpoint (before its
    summary), and again with a summary of iteration 2 put back as older versions left it:
    not finished, the recipe requeues, the next --resume writes the summary of iteration 4."""
    run = tmp_path / "run"
    assert cli.main(["train", *toy_overrides, f"log.run_dir={run}"]) == 0
    old = (run / "summary.json").read_text()
    assert json.loads(old)["iterations"] == 2 and not _recipe_requeues(run)

    def killed(self):
        raise Crash

    monkeypatch.setattr(Trainer, "_write_summary", killed)
    with pytest.raises(Crash):
        cli.main(["train", "--resume", str(run), "train.iterations=4"])
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(run).name == "ckpt-000004"
    assert not (run / "summary.json").exists() and _recipe_requeues(run)

    (run / "summary.json").write_text(old)  # a stale summary, as left before this fix
    trainer = _resume(run, toy_overrides + ["train.iterations=4"])
    assert not trainer.finished and not (run / "summary.json").exists()
    trainer._release_run_dir()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "is finished" not in out and "before -> after" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["after"]
    assert [r["iteration"] for r in metrics_of(run)] == [1, 2, 3, 4]
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert "is finished (4 of 4 iterations)" in capsys.readouterr().out


def test_a_preempted_continuation_is_requeued_by_the_recipe(
    tmp_path, toy_overrides, monkeypatch, capsys
):
    """SIGTERM (as the scheduler sends it) in iteration 3 of a continuation from 2 to 4:
    exit 75, no summary.json, so the recipe requeues; the requeued job finishes."""
    import signal

    from flowdppo.trainer.preemption import EXIT_PREEMPTED

    run = tmp_path / "run"
    assert cli.main(["train", *toy_overrides, f"log.run_dir={run}"]) == 0
    original = Trainer._safe_point

    def signalled_in_iteration_3(self, stop):
        signum, due = original(self, stop)
        return (signal.SIGTERM if self.iteration == 3 else signum), due

    monkeypatch.setattr(Trainer, "_safe_point", signalled_in_iteration_3)
    code = cli.main(["train", "--resume", str(run), "train.iterations=4"])
    assert code == EXIT_PREEMPTED
    assert "stopped by SIGTERM after iteration 3 of 4" in capsys.readouterr().err
    assert _recipe_requeues(run)
    monkeypatch.undo()
    assert cli.main(["train", "--resume", str(run)]) == 0  # the requeued job
    assert not _recipe_requeues(run)
    assert json.loads((run / "summary.json").read_text())["iterations"] == 4


@pytest.mark.parametrize("damage", ["checkpoint is a file", "latest is a directory"])
def test_replaced_checkpoint_files_are_named_before_any_work(finished_run, capsys, damage):
    run, _ = finished_run
    if damage == "checkpoint is a file":
        shutil.rmtree(run / "ckpt-000003")
        (run / "ckpt-000003").write_text("not a checkpoint")
        named = "ckpt-000003 is not a checkpoint directory"
    else:
        (run / "latest").unlink()
        (run / "latest").mkdir()
        named = "latest is a directory"
    assert cli.main(["train", "--resume", str(run), "train.iterations=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot resume {run}: ") and named in err
    assert err.count("\n") == 1 and "Traceback" not in err and "disk" not in err
    assert f"Move it out of {run}" in err
    assert not list(run.glob(".ckpt-*")) and (run / "summary.json").exists()
    assert [r["iteration"] for r in metrics_of(run)] == [1, 2, 3]


def test_latest_turned_into_a_directory_during_a_run(tmp_path, toy_overrides, monkeypatch):
    """``latest`` replaced by a directory after the first checkpoint: the second checkpoint
    is refused with a message that names it and does not claim it intact or blame the disk;
    nothing hidden is left behind."""
    original = Trainer.run_iteration

    def replace_latest(self):
        if self.iteration == 1:
            (self.run_dir / "latest").unlink()
            (self.run_dir / "latest").mkdir()
        return original(self)

    monkeypatch.setattr(Trainer, "run_iteration", replace_latest)
    with pytest.raises(ckpt.CheckpointError) as err:
        _run(tmp_path, toy_overrides)
    run = tmp_path / "run"
    msg = str(err.value)
    assert msg.startswith(f"could not write checkpoint {run / 'ckpt-000002'}")
    assert "ckpt-000001, is intact" in msg and "latest is a directory" in msg
    assert "ckpt-000002 is intact" not in msg and "disk" not in msg
    assert not (run / "ckpt-000002").exists() and not list(run.glob(".ckpt-*"))
    assert not (run / "summary.json").exists()


# ---------------------------------------------------------------- output that goes away
def test_a_closed_stdout_does_not_stop_training(tmp_path, toy_overrides, monkeypatch):
    """``flowdppo train ... | head -1``: the reader is gone before the first progress line.
    The progress falls silent; the run trains to its end and checkpoints."""
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader went away: writes fail with EPIPE
    stdout = open(write, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    run = tmp_path / "run"
    try:
        assert cli.main(["train", *toy_overrides, f"log.run_dir={run}"]) == 0
        print("more output", flush=True)  # now goes to /dev/null
    finally:
        monkeypatch.undo()
        stdout.close()
    assert [r["iteration"] for r in metrics_of(run)] == [1, 2]
    assert ckpt.latest_checkpoint(run).name == "ckpt-000002"
    assert json.loads((run / "summary.json").read_text())["iterations"] == 2


# ---------------------------------------------------------------- prompt files
def test_prompt_files_lose_a_byte_order_mark_and_invisible_lines(tmp_path):
    from flowdppo.config import ConfigError
    from flowdppo.tasks.prompts import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes(
        "\ufeffa red fox on snow\r\n"
        "\u200b\n"  # a zero-width space alone: no prompt
        " \u2060\u00ad\ufeff \t\n"  # word joiner, soft hyphen, a stray mark: no prompt
        "\u200btwo cats\u200b \n"  # invisible ends go, the prompt stays
        "a family \U0001f468\u200d\U0001f469\u200d\U0001f467\n".encode()  # a joiner inside stays
    )
    assert read_prompts(str(path), "data.train_prompts") == [
        "a red fox on snow",
        "two cats",
        "a family \U0001f468\u200d\U0001f469\u200d\U0001f467",
    ]
    path.write_bytes("\ufeff\n\u200b\n\u200c \n".encode())
    with pytest.raises(ConfigError, match="data.heldout_prompts: prompt file .* holds no prompts"):
        read_prompts(str(path), "data.heldout_prompts")


# ---------------------------------------------------------------- paths


def test_a_run_dir_under_a_tilde_goes_home(tmp_path, monkeypatch, toy_overrides):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *toy_overrides, "train.iterations=1", "log.run_dir=~/runs/x"]) == 0
    assert (tmp_path / "home" / "runs" / "x" / "summary.json").is_file()
    assert not (tmp_path / "~").exists()


# ---------------------------------------------------------------- Ctrl-C, a hung reward
@pytest.mark.parametrize("where", ["train start-up", "eval"])
def test_ctrl_c_outside_the_training_loop_is_one_line_and_130(
    finished_run, monkeypatch, capsys, where
):
    from flowdppo import runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run, _ = finished_run
    if where == "eval":
        monkeypatch.setattr(runs, "load_run", interrupted)
        args = ["eval", str(run)]
    else:
        monkeypatch.setattr(loop, "task_for_config", interrupted)  # the model is loading
        args = ["train", "--resume", str(run), "train.iterations=5"]
    capsys.readouterr()
    assert cli.main(args) == 130
    assert capsys.readouterr().err == "flowdppo: interrupted (Ctrl-C)\n"
    monkeypatch.undo()
    assert cli.main(["train", "--resume", str(run)]) == 0  # the run's lock was let go


def test_a_reward_that_never_returns_stops_the_run_naming_it(tmp_path, toy_overrides, capsys):
    import threading

    release = threading.Event()

    def hangs(images, prompts):
        release.wait(20)  # forever, as far as the run can tell
        return _brightness(images, prompts)

    _register("toy_hangs", hangs)
    run = tmp_path / "run"
    args = ["reward.names=[toy_hangs]", "reward.timeout_s=0.3", f"log.run_dir={run}"]
    try:
        assert cli.main(["train", *toy_overrides, *args]) == 2
    finally:
        release.set()
    err = capsys.readouterr().err
    assert err.startswith("error: reward 'toy_hangs' did not return within reward.timeout_s")
    assert "= 0.3 s" in err and err.count("\n") == 1


# ---------------------------------------------------------------- writes other than checkpoints
def test_full_disk_while_writing_a_grid(tmp_path, toy_overrides, monkeypatch, capsys):
    from PIL import Image

    original = Image.Image.save

    def fill_up(self, fp, *args, **kwargs):
        if "iter-000002" in str(fp):
            _enospc()
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fill_up)
    run = tmp_path / "run"
    assert cli.main(["train", *toy_overrides, f"log.run_dir={run}"]) == 2
    err = capsys.readouterr().err
    grid = run / "grids" / "iter-000002.png"
    assert err == (
        f"error: could not write {grid}: No space left on device. Free disk space; the last "
        f"complete checkpoint, {run / 'ckpt-000001'}, is intact: flowdppo train --resume {run}\n"
    )
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["iter-000000.png"]


def test_a_tensorboard_failure_is_named_and_not_hidden_by_its_close(
    tmp_path, toy_overrides, monkeypatch, capsys
):
    """TensorBoard's writer thread fails (a file-size limit: EFBIG, no file name): the error
    names the tensorboard folder, not metrics.jsonl, and its re-raise when the writer
    closes does not replace that account with a traceback."""
    from flowdppo.trainer.runlog import TensorBoardLogger

    def too_large(*args):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    original = TensorBoardLogger.scalars
    monkeypatch.setattr(
        TensorBoardLogger,
        "scalars",
        lambda self, it, m: too_large() if it == 2 else original(self, it, m),
    )
    monkeypatch.setattr(TensorBoardLogger, "close", lambda self: too_large())
    run = tmp_path / "run"
    assert cli.main(["train", *toy_overrides, "log.tensorboard=true", f"log.run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not append to {run / 'tensorboard'} (File too large)")
    assert "metrics.jsonl" not in err and "ulimit -f" in err and err.count("\n") == 1
    assert ckpt.latest_checkpoint(run).name == "ckpt-000001"


def test_a_run_dir_near_the_path_length_limit_fails_before_any_work(tmp_path, toy_overrides):
    # Long enough that a short probe name fits and config.yaml's temporary name does not.
    run = tmp_path
    while len(str(run)) < 4082 - 250:
        run = run / ("d" * 200)
    run = run / ("r" * (4082 - len(str(run)) - 1))
    assert len(str(run)) == 4082  # PATH_MAX is 4096 with its NUL
    with pytest.raises(TrainingError, match="is not writable.*File name too long"):
        Trainer(load_config(None, toy_overrides), run)
    assert not (run / "config.yaml").exists()


def test_other_commands_name_the_file_they_cannot_write(finished_run, tmp_path, capsys):
    run, _ = finished_run
    assert cli.main(["report", str(run), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {tmp_path} is a directory; name the HTML file, e.g. " + (
        f"{tmp_path}/report.html\n"
    )
    out = tmp_path / "missing" / "metrics.json"
    assert cli.main(["eval", str(run), "-n", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: No such file or directory (") and err.count("\n") == 1


def test_sample_refuses_more_samples_than_memory_holds_before_any_work(tmp_path, capsys):
    out = tmp_path / "s.png"
    args = ["--task", "digits", "--prompts", "three", "-n", "1000000000000", "--out", str(out)]
    code = cli.main(["sample", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: -n 1000000000000 x 1 prompts asks for")
    assert "memory" in err and err.count("\n") == 1 and not out.exists()


def test_resume_while_the_disk_is_still_full(finished_run, monkeypatch, capsys):
    """A continuation whose first write (config.yaml's new budget) fails: one line naming
    the file and the cause; the run is as it was."""
    import stat

    run, _ = finished_run
    config = (run / "config.yaml").read_text()
    fsync = os.fsync

    def full(fd):  # the data of a file cannot reach the disk
        if stat.S_ISREG(os.fstat(fd).st_mode):
            _enospc()
        fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", full)
    assert cli.main(["train", "--resume", str(run), "train.iterations=5"]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err == f"error: {run / 'config.yaml'}: No space left on device (Free disk space)\n"
    assert (run / "config.yaml").read_text() == config and not list(run.glob("*.tmp"))
    assert cli.main(["train", "--resume", str(run), "train.iterations=4"]) == 0  # space is back
