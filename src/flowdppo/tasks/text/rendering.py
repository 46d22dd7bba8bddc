"""Ground-truth word images: dark text on a light 32 x 128 background, Pillow's own font.

The font is the scalable one that ships inside Pillow (``ImageFont.load_default(size)``,
Pillow >= 10.1), so no system font is needed and every machine renders the same pixels.
Pretraining draws each word at a random size, stroke weight and offset from the centre
(:func:`sample_style`), so the base model learns a spread of renderings and, trained
briefly, renders some letters badly: that is the headroom RL works on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

HEIGHT, WIDTH = 32, 128
#: Font sizes (pixels), stroke widths and the largest offsets from the centre. Small on
#: purpose: with offsets of 8 x 3 pixels and sizes 16-20, 1,500 pretraining steps gave a
#: mean OCR reward of 0.02 (the samples blur the many placements together); at 2 x 1 and
#: 17-19, 1,000 steps give 0.37 (docs/text-task.md).
SIZES = (17, 18, 19)
STROKES = (0, 1)
MAX_DX, MAX_DY = 2, 1


@dataclass(frozen=True)
class Style:
    size: int = 18
    stroke: int = 0
    dx: int = 0
    dy: int = 0


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError(
            "the text task needs Pillow >= 10.1 built with FreeType (its scalable default "
            "font); upgrade Pillow: pip install -U pillow"
        )
    return font


def render(word: str, style: Style = Style()) -> np.ndarray:
    """``word`` drawn centred (plus the style's offset): float32 [HEIGHT, WIDTH] in [0, 1],
    1 the background. A word wider than the image is drawn shrunk until it fits."""
    img = Image.new("L", (WIDTH, HEIGHT), 255)
    draw = ImageDraw.Draw(img)
    size = style.size
    while True:
        font = _font(size)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font, stroke_width=style.stroke)
        if right - left <= WIDTH - 4 or size <= 8:
            break
        size -= 1
    x = (WIDTH - (right - left)) // 2 - left + style.dx
    y = (HEIGHT - (bottom - top)) // 2 - top + style.dy
    draw.text((x, y), word, fill=0, font=font, stroke_width=style.stroke, stroke_fill=0)
    return np.asarray(img, dtype=np.float32) / 255.0


def sample_style(rng: np.random.Generator) -> Style:
    return Style(
        size=int(rng.choice(SIZES)),
        stroke=int(rng.choice(STROKES)),
        dx=int(rng.integers(-MAX_DX, MAX_DX + 1)),
        dy=int(rng.integers(-MAX_DY, MAX_DY + 1)),
    )


def word_batch(
    words: list[str], n: int, rng: np.random.Generator
) -> tuple[torch.Tensor, list[str]]:
    """``n`` random words of ``words`` in random styles: (images [n, 1, H, W] in [-1, 1],
    the words)."""
    picked = [words[i] for i in rng.integers(0, len(words), size=n)]
    images = np.stack([render(w, sample_style(rng)) for w in picked])
    return torch.from_numpy(images)[:, None] * 2 - 1, picked
