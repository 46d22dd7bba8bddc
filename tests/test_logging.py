"""What a run logs: grids with gaps, captions and rewards, pages, videos as GIF and MP4,
TensorBoard images and scalars (one point per iteration after resumes), wandb offline."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowdppo.trainer import media
from flowdppo.trainer.runlog import TensorBoardLogger, WandbLogger, read_metrics


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_has_one_point_per_iteration_after_two_resumes(toy_run):
    # Iterations 4 and 5 were logged twice by killed attempts; each resume purges what
    # came after its checkpoint and keeps the checkpoint's own iteration.
    assert [r["iteration"] for r in read_metrics(toy_run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    acc = _events(toy_run)
    for tag in ("reward/mean", "kl_ref/mean", "eval/train/reward/mean"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == ([1, 2, 3, 4, 5, 6] if tag != "eval/train/reward/mean" else [2, 4, 6])
    # The grid of every evaluation is an image, iteration 0 (before training) included.
    images = acc.Images("samples/page1")
    assert [e.step for e in images] == [0, 2, 4, 6]
    png = Image.open(toy_run / "grids" / "iter-000006.png")
    assert (images[-1].width, images[-1].height) == png.size


def test_grid_has_gaps_row_captions_and_rewards(tmp_path):
    images = torch.ones(6, 1, 8, 8)  # white cells: the gaps and the text are what is not
    pages = media.write_grid(images, ["one"] * 3 + ["two"] * 3, tmp_path / "g.png", 3, [0.5] * 6)
    assert [p.png.name for p in pages] == ["g.png"] and pages[0].gif is None
    grid = np.asarray(Image.open(pages[0].png).convert("L"))
    cell, gap, text = 64, media.GAP, media.TEXT_H
    assert grid.shape == (2 * (text + cell + text + gap) + gap, 3 * (cell + gap) + gap)
    # A caption line over each row, a reward line under each cell (dark pixels in both).
    for row in range(2):
        top = gap + row * (text + cell + text + gap)
        assert (grid[top : top + text, : 3 * 6] < 128).any()  # "one" / "two"
        assert (grid[top + text + cell : top + 2 * text + cell, gap : gap + 30] < 128).any()
    without = media.render_pages(images, ["one"] * 6, 3)[0][0]
    assert without.size[1] == 2 * (text + cell + gap) + gap  # rewards are optional


def test_heldout_rows_are_marked_in_the_grid():
    images = torch.ones(4, 1, 8, 8)  # white cells: the captions are the only ink
    captions = ["one", "one", "two", "two"]
    (page,) = media.render_pages(images, captions, 2, heldout_from=2)
    grid = np.asarray(page[0].convert("RGB")).astype(int)
    row_h = media.TEXT_H + 64 + media.GAP

    def caption(row):  # the caption strip's inked pixels
        strip = grid[media.GAP + row * row_h :][: media.TEXT_H].reshape(-1, 3)
        return strip[(strip < 200).any(axis=1)]

    trained, held = caption(0), caption(1)
    assert len(trained) and (trained[:, 0] == trained[:, 1]).all()  # grey ink
    assert len(held) and (held[:, 0] > held[:, 1]).all()  # red ink: "held-out: two"
    assert len(held) > len(trained)  # the mark's words
    (plain,) = media.render_pages(images, captions, 2)
    ink = np.asarray(plain[0].convert("RGB")).astype(int)
    assert (ink[..., 0] == ink[..., 1]).all()  # no held-out prompts: no red


def test_piped_progress_lines_carry_the_bars_eta():
    from flowdppo.trainer.runlog import Progress

    now = [100.0]
    lines = []
    progress = Progress(total=10, start=4, clock=lambda: now[0])  # resumed at 4 of 10
    progress.tty, progress.bar = False, None  # piped
    import flowdppo.trainer.runlog as runlog

    echo = runlog.echo
    runlog.echo = lines.append
    try:
        for it in (4, 5):
            now[0] += 3.0  # 3 s per iteration since this start
            progress.update(it, 10, {"reward/mean": 0.5, "kl_ref/mean": 2.889e-2})
    finally:
        runlog.echo = echo
    # 6 iterations of 10 done, 3 s each: 4 left, 12 s; KL in the unit of every surface.
    assert lines[-1].startswith("iter 6/10 reward 0.5000 kl_ref 28.9e-3/step ")
    assert lines[-1].endswith("elapsed 0:06 eta 0:12")
    assert lines[0].endswith("elapsed 0:03 eta 0:15")


def test_grids_of_many_prompts_are_paged_by_16_rows(tmp_path):
    captions = [f"prompt {i}" for i in range(40) for _ in range(2)]
    pages = media.write_grid(torch.rand(80, 1, 4, 4), captions, tmp_path / "g.png", 2)
    assert [p.png.name for p in pages] == ["g.png", "g-p2.png", "g-p3.png"]
    heights = [Image.open(p.png).size[1] for p in pages]
    assert heights[0] == heights[1] == 16 * (media.TEXT_H + 64 + media.GAP) + media.GAP
    assert heights[2] == 8 * (media.TEXT_H + 64 + media.GAP) + media.GAP


def test_videos_are_written_as_gif_and_mp4(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    frames = torch.zeros(2, 3, 5, 8, 12)
    for f in range(5):
        frames[:, :, f, :, f] = 1.0  # a bright column that moves right
    (page,) = media.write_grid(frames, ["a", "b"], tmp_path / "v.png", 2, [0.1, 0.2])
    gif = Image.open(page.gif)
    assert gif.n_frames == 5
    reader = imageio.get_reader(page.mp4)
    video = [np.asarray(f) for f in reader]
    reader.close()
    assert len(video) == 5
    assert video[0].shape[:2] == tuple(x + x % 2 for x in reversed(gif.size))
    assert not np.array_equal(video[0], video[4])  # the frames move
    # The PNG shows the middle frame.
    middle = Image.open(page.png)
    gif.seek(2)
    assert np.array_equal(np.asarray(middle.convert("RGB")), np.asarray(gif.convert("RGB")))
    # TensorBoard gets the still page and the animated GIF.
    tb = TensorBoardLogger(tmp_path, 0)
    tb.grid(3, [page])
    tb.close()
    acc = _events(tmp_path)
    (still,) = acc.Images("samples/page1")
    (video,) = acc.Images("videos/page1")
    assert still.step == video.step == 3
    assert video.encoded_image_string == page.gif.read_bytes()


def test_sample_writes_the_captioned_grid(tmp_path, capsys):
    from flowdppo.cli import main

    out = tmp_path / "s.png"
    assert (
        main(["sample", "--task", "toy", "--prompts", "bright,dark", "-n", "3", "--out", str(out)])
        == 0
    )
    assert Image.open(out).size == (
        3 * (64 + media.GAP) + media.GAP,
        2 * (media.TEXT_H + 64 + media.GAP) + media.GAP,
    )
    assert str(out) in capsys.readouterr().out


def _wandb_records(path: Path):
    """The records of an offline run's .wandb file (LevelDB-style log, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending + chunk if kind == 4 else chunk)
            yield rec
        pending = chunk if kind == 2 else pending + chunk if kind == 3 else b""


def test_wandb_offline_logs_scalars_and_grids(tmp_path, monkeypatch, toy_overrides):
    pytest.importorskip("wandb")
    from flowdppo.config import load_config
    from flowdppo.trainer.loop import Trainer

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    run_dir = tmp_path / "run"
    cfg = load_config(
        None,
        toy_overrides
        + [
            "train.iterations=1",
            "log.wandb=true",
            "log.wandb_mode=offline",
            f"log.run_dir={run_dir}",
        ],
    )
    torch.set_num_threads(1)
    Trainer(cfg, run_dir).train()
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    history = {}
    for rec in _wandb_records(offline / f"run-{run_id}.wandb"):
        if rec.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item
            }
            history.setdefault(items["_step"], {}).update(items)
    assert sorted(history) == [0, 1]  # the grid before training, then iteration 1
    assert history[1]["reward/mean"] == pytest.approx(
        read_metrics(run_dir / "metrics.jsonl")[0]["reward/mean"]
    )
    assert history[0]["samples/page1/_type"] == "image-file"
    assert len(list((offline / "files" / "media" / "images").rglob("*.png"))) == 2
    assert os.environ.get("WANDB_MODE") is None  # offline came from the config
    # A resumed run continues the same wandb run; a video task's pages go as videos.
    frames = torch.rand(2, 1, 3, 4, 4)
    pages = media.write_grid(frames, ["bright", "dark"], tmp_path / "v.png", 2, [0.1, 0.2])
    logger = WandbLogger(cfg, run_dir, start_iteration=1)
    logger.grid(2, pages)
    logger.close()
    logger.wandb.teardown()  # the service writes the offline file; wait for it to stop
    assert logger.run.id == run_id
    (resumed,) = (o for o in (run_dir / "wandb").glob(f"offline-run-*-{run_id}") if o != offline)
    videos = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
        for rec in _wandb_records(resumed / f"run-{run_id}.wandb")
        if rec.WhichOneof("record_type") == "history"
    ]
    assert [(v["_step"], v["videos/page1/_type"]) for v in videos] == [(2, "video-file")]
    assert list((resumed / "files" / "media" / "videos").rglob("*.mp4"))


def test_wandb_missing_is_one_error_before_work(tmp_path, monkeypatch, toy_overrides, capsys):
    import sys

    from flowdppo.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    run_dir = tmp_path / "run"
    assert main(["train", *toy_overrides, "log.wandb=true", f"log.run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: log.wandb=true needs the wandb package")
    assert not (run_dir / "metrics.jsonl").exists()


def test_wandb_online_without_a_login_is_one_error_before_work(
    tmp_path, monkeypatch, toy_overrides, capsys
):
    pytest.importorskip("wandb")
    from flowdppo.cli import main

    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no credentials anywhere
    run_dir = tmp_path / "run"
    assert main(["train", *toy_overrides, "log.wandb=true", f"log.run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: log.wandb=true in online mode needs a wandb login")
    assert "log.wandb_mode=offline" in err
    assert not (run_dir / "metrics.jsonl").exists()

    # With a login entry for the host, the check lets the run go on to wandb itself.
    from flowdppo.config import load_config
    from flowdppo.trainer.runlog import check_wandb

    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password KEY\n")
    check_wandb(load_config(None, [*toy_overrides, "log.wandb=true"]))


def test_grid_notes_go_under_each_sample_before_its_reward(tmp_path):
    import torch as t

    images = t.ones(2, 1, 8, 8)
    with_notes = media.render_pages(images, ["a", "a"], 2, [0.5, 0.25], notes=["riv", "river"])
    plain = media.render_pages(images, ["a", "a"], 2, [0.5, 0.25])
    a = np.asarray(with_notes[0][0].convert("L"))
    b = np.asarray(plain[0][0].convert("L"))
    assert a.shape == b.shape and (a != b).any()  # same layout, the notes drawn in
    assert media._label(0.5, "riv") == '"riv" 0.500' and media._label(None, "x") == '"x"'
    with pytest.raises(ValueError, match="2 samples but 1 notes"):
        media.render_pages(images, ["a", "a"], 2, notes=["one"])
