"""The command line: argument handling that needs no training run."""

import pytest

from flowdppo import cli
from flowdppo.trainer.loop import Trainer


def test_train_task_flag_applies_the_tasks_recommended_budget(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_init(self, cfg, run_dir, resume=False):
        seen["cfg"], seen["run_dir"] = cfg, run_dir
        raise Stop

    monkeypatch.setattr(Trainer, "__init__", fake_init)
    with pytest.raises(Stop):
        cli.main(["train", "--task", "shapes", "train.group_size=4", f"log.run_dir={tmp_path}"])
    cfg = seen["cfg"]
    assert cfg.task == "shapes" and cfg.run_name == "dppo-shapes"
    assert cfg.train.iterations == 150  # the shapes recommendation
    assert cfg.train.group_size == 4  # the command line wins


def test_unknown_task_is_a_clear_error(capsys):
    assert cli.main(["train", "--task", "nope"]) == 2
    assert "unknown task 'nope'; available: digits, shapes" in capsys.readouterr().err


def test_resume_takes_no_other_arguments(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path), "--task", "shapes"]) == 2
    assert "drop the other arguments" in capsys.readouterr().err
