"""Rewards from the user's own code: ``reward.names`` by import path and ``reward.plugins``.

The training runs are the ``flowdppo`` console script in a subprocess whose working
directory holds the user's module, exactly as a user runs it: no wrapper script, no
PYTHONPATH. Bad import paths and plugins are checked in process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import CONFIG as FAULTS_CONFIG

from flowdppo import cli
from flowdppo.trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

USER_REWARD = """
import torch


def darkness(target: float = 0.2):
    def reward(images, prompts):
        return -(images.mean(dim=(1, 2, 3)) - target).abs()
    return reward
"""

# A plugin registers a reward by name on import, as a package of rewards would.
PLUGIN = """
from flowdppo.rewards import register_reward


@register_reward("user_contrast")
def contrast():
    return lambda images, prompts: images.std(dim=(1, 2, 3))
"""

# The crash tests' tiny digits run, with the user's rewards.
CONFIG = FAULTS_CONFIG + [
    "reward.names=[user_reward:darkness,user_contrast,digit_prob]",
    "reward.plugins=[user_plugin]",
    "reward.options={user_reward:darkness: {target: 0.3}}",
    "reward.weights.user_contrast={value: 0.5, warmup_iterations: 3}",
]


def _flowdppo_command() -> list[str]:
    script = Path(sys.executable).parent / "flowdppo"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "flowdppo"]


def _start(cwd: Path, args: list[str], fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("FLOWDPPO_FAULT", None)
    env.pop("PYTHONPATH", None)  # the user's module is found in the working directory
    if fault:
        env["FLOWDPPO_FAULT"] = fault
    return subprocess.Popen(
        _flowdppo_command() + args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(cwd: Path, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return _finish(_start(cwd, args, fault))


@pytest.fixture
def user_dir(tmp_path):
    (tmp_path / "user_reward.py").write_text(USER_REWARD)
    (tmp_path / "user_plugin.py").write_text(PLUGIN)
    return tmp_path


def _model_sha(run: Path) -> str:
    return ckpt.verify_checkpoint(run / (run / ckpt.LATEST).read_text().strip())["sha256"]


def test_user_reward_trains_resumes_bit_exact_evaluates_and_samples(user_dir, monkeypatch):
    reference_proc = _start(user_dir, ["train", *CONFIG, "log.run_dir=ref"])
    try:
        # Killed in iteration 3's update, resumed with nothing but the run directory.
        killed = _run(user_dir, ["train", *CONFIG, "log.run_dir=run"], fault="update:11")
        assert killed.returncode < 0, killed.stderr[-2000:]
        resumed = _run(user_dir, ["train", "--resume", "run"])
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        ref = _finish(reference_proc)
        assert ref.returncode == 0, ref.stderr[-2000:]
    finally:
        if reference_proc.poll() is None:
            reference_proc.kill()
            reference_proc.wait()

    run, reference = user_dir / "run", user_dir / "ref"
    assert _model_sha(run) == _model_sha(reference)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    for name in ("user_reward:darkness", "user_contrast", "digit_prob"):
        assert all(f"time/reward/{name}" in r and f"reward/{name}/mean" in r for r in rows)
    # The warm-up: 0, 1/3, 2/3 of the weight, then the weight.
    weights = [r["reward/user_contrast/weight"] for r in rows]
    assert weights == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5, 0.5])

    # eval and sample in this process, which has never imported the user's modules: the
    # run's config.yaml alone brings them in.
    assert "user_reward" not in sys.modules and "user_plugin" not in sys.modules
    monkeypatch.chdir(user_dir)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert cli.main(["eval", "run", "-n", "2", "--out", "eval.json"]) == 0
    metrics = json.loads((user_dir / "eval.json").read_text())
    assert "eval/train/reward/user_reward:darkness" in metrics
    assert "eval/train/reward/user_contrast" in metrics
    assert cli.main(["sample", "--run", "run", "--prompts", "three", "-n", "2"]) == 0
    assert (user_dir / "samples.png").is_file()


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- user-reward-example -->\n```bash\n(.*?)```", text, flags=re.S)
    assert found, "README.md shows the user reward example between its markers"
    return found.group(1)


def test_readme_user_reward_example_runs(tmp_path):
    script = _readme_example()
    assert len(script.strip().splitlines()) <= 12
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PATH"] = f"{Path(_flowdppo_command()[0]).parent}{os.pathsep}{env['PATH']}"
    env.pop("PYTHONPATH", None)
    if not (Path(sys.executable).parent / "flowdppo").is_file():
        pytest.skip("the flowdppo console script is not installed next to this Python")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    cfg = (run / "config.yaml").read_text()
    assert "my_reward:brightness" in cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("reward/my_reward:brightness/mean" in r for r in rows)


# ---------------------------------------------------------------- bad user code
BAD = {
    "flowdppo_missing_mod_x:make": "reward.names: cannot import module 'flowdppo_missing_mod_x'",
    "user_raises:make": "reward.names: importing module 'user_raises' raised RuntimeError: "
    "broken on import",
    "user_values:NOT_A_FUNCTION": "reward.names: 'user_values:NOT_A_FUNCTION' is an object of "
    "type int, not callable",
    "user_values:nothing_here": "reward.names: 'user_values:nothing_here': 'user_values' has no "
    "attribute 'nothing_here'",
    "user_values:": "not an import path of the form package.module:function",
    "user_values:reward_itself": "needs the arguments ['images', 'prompts'] to be built",
    "user_values:returns_number": "its factory returned a int, not a callable",
}


@pytest.fixture
def bad_modules(tmp_path, monkeypatch):
    (tmp_path / "user_raises.py").write_text("raise RuntimeError('broken on import')\n")
    (tmp_path / "user_values.py").write_text(
        "NOT_A_FUNCTION = 3\n\n\n"
        "def reward_itself(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n\n\n"
        "def returns_number():\n    return 1\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_import_path_is_one_error_line_before_any_work(
    bad_modules, toy_overrides, capsys, name
):
    run_dir = bad_modules / "run"
    code = cli.main(["train", *toy_overrides, f"reward.names=['{name}']", f"log.run_dir={run_dir}"])
    line = _one_error_line(capsys)
    assert code == 2 and BAD[name] in line, line
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "plugin,message",
    [
        (
            "flowdppo_missing_plugin_x",
            "reward.plugins: cannot import module "
            "'flowdppo_missing_plugin_x': it is not on the Python path",
        ),
        ("user_raises", "reward.plugins: importing module 'user_raises' raised RuntimeError"),
        ("not-a-module", "reward.plugins: 'not-a-module' is not a module name"),
    ],
)
def test_bad_plugin_is_one_error_line_before_any_work(
    bad_modules, toy_overrides, capsys, plugin, message
):
    run_dir = bad_modules / "run"
    code = cli.main(
        ["train", *toy_overrides, f"reward.plugins=[{plugin}]", f"log.run_dir={run_dir}"]
    )
    line = _one_error_line(capsys)
    assert code == 2 and message in line, line
    assert not run_dir.exists()


def _snapshot(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def test_a_run_whose_plugin_is_gone_is_refused_by_resume_eval_and_sample(
    bad_modules, toy_overrides, capsys
):
    (bad_modules / "user_gone.py").write_text(PLUGIN.replace("user_contrast", "gone_contrast"))
    run = bad_modules / "run"
    args = ["train", *toy_overrides, f"log.run_dir={run}", "reward.plugins=[user_gone]"]
    assert cli.main([*args, "reward.names=[toy_brightness,gone_contrast]"]) == 0
    capsys.readouterr()
    (bad_modules / "user_gone.py").unlink()
    sys.modules.pop("user_gone", None)
    shutil.rmtree(bad_modules / "__pycache__", ignore_errors=True)
    before = _snapshot(run)
    for argv in (
        ["train", "--resume", str(run)],
        ["eval", str(run)],
        ["sample", "--run", str(run), "--prompts", "bright"],
    ):
        code = cli.main(argv)
        line = _one_error_line(capsys)
        assert code == 2 and "reward.plugins: cannot import module 'user_gone'" in line, argv
    assert _snapshot(run) == before
    assert not (bad_modules / "samples.png").exists()
