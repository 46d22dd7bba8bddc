"""flowdppo report: one self-contained HTML page, checked as text and in headless Chromium."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

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
    verdict = re.search(r"<div class='verdict \w+'>(.*?)</div>", text).group(1)
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


def test_one_run_shows_one_kl_on_every_surface(toy_run, run_report, capsys):
    """The run's final KL to the reference reads the same number in the same unit on the
    console's end table (and flowdppo eval's), the report and compare's tables; the
    progress lines and the trust-region line speak that unit too."""
    from flowdppo.cli import _print_before_after
    from flowdppo.compare.report import summary_table
    from flowdppo.config import describe_trust_region
    from flowdppo.report.runs import load_run
    from flowdppo.runs import run_config
    from flowdppo.trainer.runlog import Progress, read_metrics
    from flowdppo.units import KL_LABEL, kl_inline, kl_shown

    summary = json.loads((toy_run / "summary.json").read_text())
    kl = summary["after"]["eval/train/kl_ref/mean"]
    shown = kl_shown(kl)
    assert kl > 0 and shown == f"{kl / 1e-3:.3g}" and kl_inline(kl) == f"{shown}e-3/step"
    # The end-of-run table: the KL row, labelled with the unit, ends with the number.
    _print_before_after(summary["before"], summary["after"])
    table = capsys.readouterr().out.splitlines()
    row = next(x for x in table if x.strip().startswith("eval/train/kl_ref/mean"))
    assert f"({KL_LABEL})" in row and row.endswith(f"-> {shown}")
    assert not any("kl_ref/path" in x for x in table)  # the path sum is not shown unlabelled
    # The report: the verdict's text and the summary table's KL column.
    page = run_report.read_text()
    assert f"at KL to the reference {kl_inline(kl)};" in page
    assert (
        f"<th>KL to ref <span class=nw>({KL_LABEL})</span></th>" in page
        and f"<td>{shown}</td>" in page
    )
    # compare's console table (the report's columns), from the same run record.
    status = load_run(toy_run, "toy").result.status
    exp = SimpleNamespace(groups=lambda: ["toy"], compute_budget=None, kl_bound=None)
    head, body = summary_table(exp, [status]).splitlines()[:2]
    column = head.index(f"KL to ref ({KL_LABEL})")
    assert body[: column + len(head[column:].split("  ")[0])].split()[-1] == shown
    # Progress lines: the rollout KL of the last iteration, in the same unit.
    last = read_metrics(toy_run / "metrics.jsonl")[-1]
    progress = Progress(total=6, start=5)
    progress.bar = None
    progress.update(5, 6, last)
    assert f" kl_ref {kl_inline(last['kl_ref/mean'])} " in capsys.readouterr().out
    # The trust region at the start: Flow-DPPO's threshold is a KL, in that unit.
    cfg = run_config(toy_run)
    line = describe_trust_region(cfg)
    assert (
        f"Flow-DPPO threshold on KL(old || new): {kl_inline(cfg.objective.dppo_threshold)}" in line
    )


def test_the_verdict_colour_follows_gain_and_heldout_change(run_report, toy_run):
    from flowdppo.report.page import GAIN_MIN, HELDOUT_DROP, VERDICT_RULES, verdict_class

    nan = float("nan")
    assert verdict_class(0.39, -0.27)[0] == "mixed"  # the default run: a gain that forgot
    assert verdict_class(0.39, -HELDOUT_DROP / 2)[0] == "good"
    assert verdict_class(0.39, nan)[0] == "good"  # no held-out prompts
    assert verdict_class(GAIN_MIN / 2, +0.1)[0] == "bad"
    assert verdict_class(-0.2, -0.3)[0] == "bad"
    assert verdict_class(nan, 0.0)[0] == "none"
    # One run is a run: no winner, no star; its box is coloured by its own numbers and the
    # page states the rule.
    text = run_report.read_text()
    body = text.split("<body>", 1)[1]  # the style sheet styles a winner's row
    assert "winner" not in body.lower() and "★" not in body
    summary = json.loads((toy_run / "summary.json").read_text())
    b, a = summary["before"], summary["after"]
    gain = a["eval/train/reward/mean"] - b["eval/train/reward/mean"]
    change = a["eval/heldout/reward/mean"] - b["eval/heldout/reward/mean"]
    assert f"<div class='verdict {verdict_class(gain, change)[0]}'><b>Run: " in text
    assert VERDICT_RULES in text and f"+{GAIN_MIN:g}" in VERDICT_RULES


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
        # The layout holds on a desktop and in a phone-wide window: nothing sticks out (wide
        # tables scroll in their own box), and at 1280 px the slider's label is one line.
        for width in (1280, 390):
            browser.resize(width, 1000)
            assert browser.evaluate(headless_chromium.OVERFLOW_JS) == [], width
            browser.screenshot(tmp_path / f"report-{width}.png")
            if width == 1280:
                assert browser.evaluate(headless_chromium.LINES_JS % ".evlabel") == [1]
        # Several runs, one of them with a video evaluation: the video decodes too.
        browser.open(two_runs[0])
        assert all(w > 0 for w in browser.evaluate(headless_chromium.IMAGES_JS))
        videos = browser.evaluate(headless_chromium.VIDEOS_JS)
        assert len(videos) == (two_runs[1] / "grids" / "iter-000006.mp4").is_file()
        assert all(w > 0 for w in videos)
        for width in (390, 1280):
            browser.resize(width, 1000)
            assert browser.evaluate(headless_chromium.OVERFLOW_JS) == [], width
        assert browser.console_errors() == []
    for width in (1280, 390):
        assert Image.open(tmp_path / f"report-{width}.png").size == (width, 1000)


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


def test_a_tiny_kl_stays_in_the_one_unit():
    # The first iterations of a run print KLs of 1e-8..1e-6 nats per step: still x 1e-3.
    from flowdppo.units import kl_inline

    assert kl_inline(7.8e-8) == "0.000078e-3/step"
    assert kl_inline(2.06e-6) == "0.00206e-3/step"
    assert kl_inline(0.02889) == "28.9e-3/step" and kl_inline(0.0) == "0"
    assert kl_inline(1.5) == "1.5/step"  # a nat or more per step is written whole
