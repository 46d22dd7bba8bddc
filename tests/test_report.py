"""flowdppo report: one self-contained HTML page, checked as text and in headless Chromium."""

import json
import re
import shutil
from pathlib import Path

import headless_chromium
import pytest
import torch
from PIL import Image

from flowdppo.cli import main
from flowdppo.report import write_report
from flowdppo.trainer import media

SOURCES = re.compile(r'\b(?:src|href)="([^"]*)"')


def _report(tmp_path_factory, toy_run) -> Path:
    return write_report([toy_run], tmp_path_factory.mktemp("report") / "report.html")


@pytest.fixture(scope="module")
def run_report(tmp_path_factory, toy_run) -> Path:
    return _report(tmp_path_factory, toy_run)


def test_report_of_a_run_embeds_everything(run_report, toy_run):
    text = run_report.read_text()
    sources = SOURCES.findall(text)
    assert sources and all(s.startswith("data:") for s in sources)  # nothing to fetch
    assert "http://" not in text and "https://" not in text
    summary = json.loads((toy_run / "summary.json").read_text())
    after = summary["after"]["eval/train/reward/mean"]
    kl = summary["after"]["eval/train/kl_ref/mean"] / 1e-3
    # The verdict at the top names the run, its reward after training and its KL.
    verdict = re.search(r"<div class=verdict>(.*?)</div>", text).group(1)
    assert f"{after:.3f}" in verdict and f"{kl:.3g}" in verdict and toy_run.name in verdict
    # One slider item per evaluation grid on disk, plus the fixed "before" grid.
    assert text.count("class=eval ") == len(list((toy_run / "grids").glob("iter-*.png"))) == 4
    assert "config.yaml" in text and "train:" in text
    assert "Inference cost" not in text  # no inference_cost.json: no section, no error


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, toy_run) -> tuple[Path, Path]:
    """The toy run and a copy that ends 0.25 higher, with its inference-cost table and, as a
    video task would, its last evaluation as a video; the report of both."""
    tmp = tmp_path_factory.mktemp("two")
    better = tmp / "better"
    shutil.copytree(toy_run, better)
    summary = json.loads((better / "summary.json").read_text())
    summary["after"]["eval/train/reward/mean"] += 0.25
    (better / "summary.json").write_text(json.dumps(summary))
    # The inference-cost table as flowdppo eval --steps writes it.
    assert main(["eval", str(better), "--steps", "2,4", "-n", "1"]) == 0
    frames = torch.rand(6, 1, 4, 2, 2)
    media.write_grid(frames, ["bright"] * 6, better / "grids" / "iter-000006.png", 3, [0.5] * 6)
    out = tmp / "both.html"
    assert main(["report", str(toy_run), str(better), "--out", str(out)]) == 0
    return out, better


def test_report_of_several_runs_names_the_winner(two_runs):
    text = two_runs[0].read_text()
    assert "<b>Winner: better</b>" in text
    assert re.search(r'<tr class="winner"><td>★ better', text)
    assert "Reward-KL frontier" in text and "At matched KL" in text
    rows = json.loads((two_runs[1] / "inference_cost.json").read_text())["rows"]
    trained = sum(r["model"] == "trained" for r in rows)
    assert "Inference cost" in text and trained >= 2 and text.count("<td>trained</td>") == trained
    has_mp4 = (two_runs[1] / "grids" / "iter-000006.mp4").is_file()
    assert text.count("<video ") == has_mp4  # the video evaluation plays inline


def test_report_refuses_what_is_not_a_run(tmp_path, capsys, two_runs):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "neither a run directory" in err and err.count("\n") == 1
    # An inference-cost table of another shape is named, with its row, before any work.
    bad = tmp_path / "bad"
    shutil.copytree(two_runs[1], bad)
    (bad / "inference_cost.json").write_text(json.dumps({"rows": [{"model": "base", "nfe": "4"}]}))
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "inference_cost.json: row 0 needs" in err
    assert not (bad / "report.html").exists()


def test_report_loads_in_headless_chromium(run_report, two_runs, tmp_path):
    exe = headless_chromium.find_chromium()
    if exe is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    with headless_chromium.Browser(exe) as browser:
        browser.open(run_report)
        widths = browser.evaluate(headless_chromium.IMAGES_JS)
        assert len(widths) >= 10 and all(w > 0 for w in widths)  # every image decodes
        assert browser.evaluate(headless_chromium.VIDEOS_JS) == []  # an image task: no video
        # The slider shows one evaluation at a time: the last, then the first.
        shown = (
            "Array.from(document.querySelectorAll('.eval')).map(e => e.style.display !== 'none')"
        )
        assert browser.evaluate(shown) == [False, False, False, True]
        browser.evaluate(
            "var s = document.querySelector('.evals input'); s.value = 0;"
            "s.dispatchEvent(new Event('input')); 0"
        )
        assert browser.evaluate(shown) == [True, False, False, False]
        assert browser.evaluate("document.querySelector('.evlabel').textContent").startswith(
            "iteration 0"
        )
        shot = tmp_path / "report.png"
        browser.screenshot(shot)
        # Several runs, one of them with a video evaluation: the video decodes too.
        browser.open(two_runs[0])
        assert all(w > 0 for w in browser.evaluate(headless_chromium.IMAGES_JS))
        videos = browser.evaluate(headless_chromium.VIDEOS_JS)
        assert len(videos) == (two_runs[1] / "grids" / "iter-000006.mp4").is_file()
        assert all(w > 0 for w in videos)
        assert browser.console_errors() == []
    assert Image.open(shot).size == (1280, 1000)


@pytest.mark.parametrize(
    "damage,named",
    [
        (lambda run: (run / "grids" / "iter-000002.png").write_bytes(b""), "empty (0 bytes)"),
        (
            lambda run: (run / "grids" / "iter-000002.png").write_bytes(
                (run / "grids" / "iter-000002.png").read_bytes()[:100]
            ),
            "a cut PNG image",
        ),
        (
            lambda run: (run / "metrics.jsonl").write_text(
                (run / "metrics.jsonl").read_text()[:-30]
            ),
            "line 6, is not a metrics row",
        ),
    ],
    ids=["empty grid", "cut grid", "cut metrics line"],
)
def test_a_file_cut_by_a_kill_is_one_error_naming_it(tmp_path, capsys, toy_run, damage, named):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    damage(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err
    name = "metrics.jsonl" if "metrics" in named else "iter-000002.png"
    assert str(run / ("" if "metrics" in named else "grids") / name) in err
    assert not (run / "report.html").exists()


def test_grids_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "grids" / "iter-000002.png"
    media.write_grid(torch.rand(2, 1, 4, 4), ["bright"] * 2, path, 2)
    before = path.read_bytes()

    def killed_mid_write(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG")  # the first bytes, then the process is gone
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        media.write_grid(torch.rand(2, 1, 4, 4), ["dark"] * 2, path, 2)
    assert path.read_bytes() == before  # the previous grid, whole
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing half-written


def test_an_interrupted_eval_keeps_the_previous_inference_cost_table(
    tmp_path, monkeypatch, two_runs
):
    from flowdppo.trainer import checkpoint

    run = tmp_path / "run"
    shutil.copytree(two_runs[1], run)
    table = (run / "inference_cost.json").read_text()

    class Killed(BaseException):
        pass

    def killed(fd):
        raise Killed  # the table is written, not yet in place

    monkeypatch.setattr(checkpoint.os, "fsync", killed)
    with pytest.raises(Killed) as err:
        main(["eval", str(run), "--steps", "2", "-n", "1"])
    assert err.traceback[-2].name == "write_text_atomic"
    assert (run / "inference_cost.json").read_text() == table
    assert not list(run.glob("*.tmp"))


def test_a_unicode_run_dir_under_an_ascii_locale(tmp_path, toy_run):
    """Without Python's UTF-8 mode, under the C locale, a path's non-ASCII bytes reach the
    report as lone surrogates: its title and plots still show the run's name."""
    import os
    import subprocess
    import sys

    run = tmp_path / "rün-ü"
    shutil.copytree(toy_run, run)
    env = dict(os.environ, LC_ALL="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    proc = subprocess.run(
        [sys.executable, "-m", "flowdppo", "report", str(run)],
        env=env,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert "flowdppo run: rün-ü" in (run / "report.html").read_text(encoding="utf-8")
