"""What a run writes: metrics.jsonl, TensorBoard events, sample grids, console progress."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from flowdppo.trainer.checkpoint import write_text_atomic

METRICS = "metrics.jsonl"


def _clean(value: float) -> float | None:
    # JSON has no NaN / inf; write null so every line stays valid JSON.
    return value if math.isfinite(value) else None


class RunLog:
    """Appends one JSON line per iteration and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, start_iteration: int = 0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        truncate_metrics(self.path, start_iteration)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past its last checkpoint.
            self.writer = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=start_iteration
            )

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        record = {"iteration": iteration, **{k: _clean(float(v)) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self.writer.add_scalar(k, float(v), iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_metrics(path: Path, keep_through: int) -> None:
    """Keep metric lines of iterations ``<= keep_through`` (the resumed checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= keep_through:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut by a kill: everything after it is stale too
    # Atomic: a kill during this rewrite must not lose the lines being kept.
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_grid(
    images: torch.Tensor, captions: list[str], path: Path, columns: int, cell: int | None = None
) -> None:
    """Save images [B, C, H, W] in [0, 1] as a PNG grid with their captions underneath.

    Neighbours in a row with the same caption share one caption spanning them, so a long
    caption (a compositional prompt) stays readable when every row is one prompt.

    Videos [B, C, F, H, W] show their middle frame. Each image is scaled so that its longer
    side is ``cell`` pixels (default: its own size, at least 64 and at most 256), keeping
    its aspect ratio: small images are enlarged with hard pixel edges, large ones smoothly.
    """
    images = images.detach().float().clamp(0, 1).cpu()
    if images.dim() == 5:
        images = images[:, :, images.shape[2] // 2]
    if images.dim() != 4:
        raise ValueError(
            f"save_grid takes images [B, C, H, W] or videos [B, C, F, H, W], got "
            f"{tuple(images.shape)}"
        )
    b, c, h, w = images.shape
    cell = cell or min(256, max(64, h, w))
    cw, ch = (cell, max(1, round(cell * h / w))) if w >= h else (max(1, round(cell * w / h)), cell)
    resample = Image.NEAREST if cw >= w else Image.BILINEAR
    rows = math.ceil(b / columns)
    caption_h = 12
    canvas = Image.new("RGB", (columns * cw, rows * (ch + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        arr = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        img = Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3]).convert("RGB")
        img = img.resize((cw, ch), resample)
        x, y = (i % columns) * cw, (i // columns) * (ch + caption_h)
        canvas.paste(img, (x, y))
        starts_run = i % columns == 0 or captions[i] != captions[i - 1]
        if starts_run:
            run = 1
            while i + run < b and (i + run) % columns != 0 and captions[i + run] == captions[i]:
                run += 1
            # The default bitmap font is 6 pixels per character.
            draw.text((x + 2, y + ch), captions[i][: run * cw // 6], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


class Progress:
    """A live bar on a terminal; one plain line per iteration otherwise."""

    def __init__(self, total: int, start: int):
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

    def update(self, iteration: int, total: int, metrics: dict[str, float]) -> None:
        reward = metrics.get("reward/mean", float("nan"))
        kl = metrics.get("kl_ref/mean", float("nan"))
        # The fraction of step terms whose gradient the objective removed, whatever the
        # objective (a ratio-clip window fraction would overstate it, docs/method.md).
        extra = metrics.get("grad_blocked_fraction", float("nan"))
        label = "blocked"
        if self.bar is not None:
            self.bar.set_postfix(
                reward=f"{reward:.3f}", kl_ref=f"{kl:.2e}", **{label: f"{extra:.2f}"}
            )
            self.bar.update(1)
        else:
            print(
                f"iter {iteration + 1}/{total} reward {reward:.4f} kl_ref {kl:.3e} "
                f"{label} {extra:.3f} time {metrics.get('time/iteration', 0):.2f}s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
