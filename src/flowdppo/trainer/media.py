"""Sample grids and videos: PNG pages with captions and rewards, GIF and MP4 for videos.

A grid has one row per prompt (a prompt with more samples than columns takes several
rows), a caption over each row, each sample's reward under it when there is one, and a
2-pixel gap between cells. Many prompts are split into pages of at most ``MAX_ROWS``
rows, so no page grows to thousands of pixels. The rows of held-out prompts (never
trained on) have their caption in red, after ``held-out:``. Videos [B, C, F, H, W] become a grid per
frame: the PNG shows the middle frame, the GIF (Pillow) and the MP4 (the ffmpeg binary
that ``imageio-ffmpeg`` ships; the ``video`` extra) play all frames.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

MAX_ROWS = 16  # prompt rows per page
GAP = 2  # pixels between cells
TEXT_H = 11  # a line of the default bitmap font
CHAR_W = 6  # the default bitmap font's width per character
FPS = 10  # a GIF counts in hundredths of a second
HELDOUT_MARK = "held-out: "  # before a held-out prompt's row caption, drawn in HELDOUT_COLOR
HELDOUT_COLOR = "#b3261e"
_warned: set[str] = set()


@dataclass
class GridPage:
    """The files of one page of a grid: a PNG, and for videos a GIF and (with imageio-ffmpeg)
    an MP4."""

    png: Path
    gif: Path | None = None
    mp4: Path | None = None


def _cell_size(h: int, w: int, cell: int | None) -> tuple[int, int]:
    cell = cell or min(256, max(64, h, w))
    if w >= h:
        return cell, max(1, round(cell * h / w))
    return max(1, round(cell * w / h)), cell


def _to_pil(frame: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    c, h, w = frame.shape
    arr = (frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3]).convert("RGB")
    return img.resize(size, Image.NEAREST if size[0] >= w else Image.BILINEAR)


def _row_caption(captions: list[str]) -> str:
    return " / ".join(dict.fromkeys(captions))


def render_pages(
    images: torch.Tensor,
    captions: list[str],
    columns: int,
    rewards: torch.Tensor | list[float] | None = None,
    cell: int | None = None,
    max_rows: int = MAX_ROWS,
    notes: list[str] | None = None,
    heldout_from: int | None = None,
) -> list[list[Image.Image]]:
    """Grid pages of images [B, C, H, W] or videos [B, C, F, H, W] in [0, 1]; each page is
    its list of frames (one for images).

    Each image is scaled so that its longer side is ``cell`` pixels (default: its own
    size, at least 64 and at most 256), keeping its aspect ratio: small images are
    enlarged with hard pixel edges, large ones smoothly. ``notes`` (one per sample, e.g.
    the text an OCR reward read) are written under each sample, before its reward.
    Samples from index ``heldout_from`` on are of held-out prompts: their rows are marked.
    """
    images = images.detach().float().clamp(0, 1).cpu()
    if images.dim() == 4:
        images = images[:, :, None]
    if images.dim() != 5:
        raise ValueError(
            f"a sample grid takes images [B, C, H, W] or videos [B, C, F, H, W], got "
            f"{tuple(images.shape)}"
        )
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} samples but {len(captions)} captions")
    b, _, frames, h, w = images.shape
    columns = max(1, min(columns, b))
    cw, ch = _cell_size(h, w, cell)
    values = None if rewards is None else [float(r) for r in rewards]
    if notes is not None and len(notes) != b:
        raise ValueError(f"{b} samples but {len(notes)} notes")
    under = TEXT_H if values is not None or notes is not None else 0
    row_h = TEXT_H + ch + under + GAP
    width = columns * (cw + GAP) + GAP
    n_rows = math.ceil(b / columns)
    pages = []
    for first_row in range(0, n_rows, max_rows):
        rows = range(first_row, min(n_rows, first_row + max_rows))
        canvases = [
            Image.new("RGB", (width, len(rows) * row_h + GAP), "white") for _ in range(frames)
        ]
        for r, row in enumerate(rows):
            idx = list(range(row * columns, min(b, (row + 1) * columns)))
            y = GAP + r * row_h
            held = heldout_from is not None and idx[0] >= heldout_from
            text = (HELDOUT_MARK if held else "") + _row_caption([captions[i] for i in idx])
            text = text[: (width - 2 * GAP) // CHAR_W]
            for f, canvas in enumerate(canvases):
                draw = ImageDraw.Draw(canvas)
                draw.text((GAP + 1, y), text, fill=HELDOUT_COLOR if held else "black")
                for col, i in enumerate(idx):
                    x = GAP + col * (cw + GAP)
                    canvas.paste(_to_pil(images[i, :, f], (cw, ch)), (x, y + TEXT_H))
                    if values is not None or notes is not None:
                        label = _label(
                            None if values is None else values[i],
                            None if notes is None else notes[i],
                        )
                        draw.text((x + 1, y + TEXT_H + ch), label[: cw // CHAR_W], fill="#333")
        pages.append(canvases)
    return pages


def _label(value: float | None, note: str | None) -> str:
    """A sample's line under the grid: its note (quoted), then its reward."""
    parts = [] if note is None else [repr(note)[1:-1].join('""')]
    if value is not None:
        parts.append(f"{value:.3f}" if math.isfinite(value) else "invalid")
    return " ".join(parts)


def page_path(path: Path, page: int, suffix: str) -> Path:
    """``path`` for the first page, ``<stem>-p<k>`` for page k; with ``suffix``."""
    stem = path.stem if page == 1 else f"{path.stem}-p{page}"
    return path.with_name(stem + suffix)


def write_grid(
    images: torch.Tensor,
    captions: list[str],
    path: Path,
    columns: int,
    rewards: torch.Tensor | list[float] | None = None,
    cell: int | None = None,
    notes: list[str] | None = None,
    heldout_from: int | None = None,
) -> list[GridPage]:
    """Write the grid's pages next to ``path`` (a .png); videos also as GIF and MP4.
    ``heldout_from``: the first sample of a held-out prompt (their rows are marked)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for k, frames in enumerate(
        render_pages(
            images, captions, columns, rewards, cell, notes=notes, heldout_from=heldout_from
        ),
        1,
    ):
        page = GridPage(page_path(path, k, ".png"))
        with written_whole(page.png) as tmp:
            frames[len(frames) // 2].save(tmp)
        if len(frames) > 1:
            page.gif = page_path(path, k, ".gif")
            with written_whole(page.gif) as tmp:
                frames[0].save(
                    tmp, save_all=True, append_images=frames[1:], duration=1000 // FPS, loop=0
                )
            page.mp4 = write_mp4(frames, page_path(path, k, ".mp4"))
        written.append(page)
    return written


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A hidden temporary name beside ``path`` (same suffix, so writers know the format),
    renamed onto it once the block has written it; removed if the block fails. A kill
    mid-write never leaves a cut file under the real name (a report would show it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:  # named after the file it was to be, not its temporary name
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_mp4(frames: list[Image.Image], path: Path) -> Path | None:
    """H.264 MP4 of the frames with imageio-ffmpeg's binary; None (and one notice per
    process) where the ``video`` extra is not installed."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401 - the binary imageio's ffmpeg plugin runs
    except ImportError:
        if "mp4" not in _warned:
            _warned.add("mp4")
            print(
                "note: videos are written as GIF only; for MP4 too: pip install "
                "'flowdppo[video]' (imageio, imageio-ffmpeg)",
                file=sys.stderr,
            )
        return None
    w, h = frames[0].size
    # yuv420p (what browsers play) needs even sides: pad with the background.
    even = (w + w % 2, h + h % 2)
    with (
        written_whole(path) as tmp,
        imageio.get_writer(
            tmp,
            fps=FPS,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=1,
            ffmpeg_log_level="error",
        ) as writer,
    ):
        for frame in frames:
            padded = Image.new("RGB", even, "white")
            padded.paste(frame)
            writer.append_data(np.asarray(padded))
    return path
