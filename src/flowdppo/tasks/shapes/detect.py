"""Exact programmatic scoring of the shapes task: an object detector and GenEval-style checks.

Detection, batched in torch:

1. a pixel is foreground when its brightest channel reaches :data:`FG_THRESHOLD`; its colour
   is the palette colour nearest in chromaticity (RGB divided by the brightest channel), or
   unknown when the pixel is unsaturated or far from every palette colour;
2. 4-connected components of equal colour; those under :data:`MIN_AREA` pixels are noise;
3. shape from the fill ratio of the bounding box (square 1, the 7x7 pixel circle 0.76,
   the apex-up triangle 0.51 with a wider bottom row than top row); an elongated box or an
   unmatched fill is an unknown shape.

Checks per caption (each a named sub-condition; ``strict`` needs all, ``soft`` is their mean):
``present[i]`` an object of group i's shape; ``colour[i]`` at least ``count`` objects of its
shape *and* colour (attribute binding); ``count[i]`` exactly ``count`` objects of its shape
(counting prompts); ``position`` a match of group 0 in the relation to a match of group 1
(GenEval's rule); ``exclusive`` no object beyond those requested. GenEval ignores unrequested
objects; here drawing every combination is cheap for the generator, so an extra object fails.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from flowdppo.tasks.shapes.grammar import COLOURS, SKILLS, PromptSpec, parse_prompt
from flowdppo.tasks.shapes.scenes import PALETTE, relation_holds

#: Brightest-channel level from which a pixel is part of an object (background is black).
FG_THRESHOLD = 0.4
#: Minimum saturation (max - min) / max of an object pixel: greys and whites match no colour.
SAT_THRESHOLD = 0.5
#: Largest chromaticity distance to the nearest palette colour (palette colours are >= 0.8
#: apart in chromaticity).
COLOUR_TOLERANCE = 0.4
#: Components smaller than this are speckle, not objects (the smallest object has 25 pixels).
MIN_AREA = 6
#: Fill-ratio boundaries, half-way between the rendered shapes (square 1.0, circle 0.755,
#: triangle 0.51): square above SQUARE_FILL, circle above CIRCLE_FILL, triangle above MIN_FILL.
SQUARE_FILL = 0.88
CIRCLE_FILL = 0.63
MIN_FILL = 0.35
#: Bounding boxes more elongated than this are no shape of the task.
MAX_ASPECT = 1.67
UNKNOWN_COLOUR = len(COLOURS)


@dataclass(frozen=True)
class Detection:
    """A detected object; ``shape`` / ``colour`` are ``None`` when unrecognised."""

    shape: str | None
    colour: str | None
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive)
    area: int

    @property
    def fill(self) -> float:
        x0, y0, x1, y1 = self.box
        return self.area / ((x1 - x0) * (y1 - y0))


@dataclass(frozen=True)
class PromptCheck:
    """The sub-conditions of one caption on one image."""

    prompt: str
    skill: str
    conditions: dict[str, bool]

    @property
    def strict(self) -> bool:
        return all(self.conditions.values())

    @property
    def soft(self) -> float:
        return sum(self.conditions.values()) / len(self.conditions)


def _chromaticity(rgb: torch.Tensor) -> torch.Tensor:
    return rgb / rgb.max(dim=-1, keepdim=True).values.clamp_min(1e-6)


_PALETTE_CHROMA = _chromaticity(torch.tensor([PALETTE[c] for c in COLOURS]))


def pixel_classes(images: torch.Tensor) -> torch.Tensor:
    """Per pixel: -1 background, ``i`` for ``COLOURS[i]``, ``UNKNOWN_COLOUR`` otherwise.

    ``images``: [B, 3, H, W] in [0, 1]; returns a LongTensor [B, H, W].
    """
    rgb = images.float().clamp(0, 1).permute(0, 2, 3, 1)
    vmax = rgb.max(dim=-1).values
    vmin = rgb.min(dim=-1).values
    fg = vmax >= FG_THRESHOLD
    sat = (vmax - vmin) / vmax.clamp_min(1e-6)
    dist = torch.cdist(_chromaticity(rgb).reshape(-1, 3), _PALETTE_CHROMA).view(*vmax.shape, -1)
    best, idx = dist.min(dim=-1)
    known = (sat >= SAT_THRESHOLD) & (best <= COLOUR_TOLERANCE)
    cls = torch.where(known, idx, torch.full_like(idx, UNKNOWN_COLOUR))
    return torch.where(fg, cls, torch.full_like(cls, -1))


def connected_components(classes: torch.Tensor) -> torch.Tensor:
    """4-connected components of equal class, all images at once.

    Returns [B, H, W] labels: the flat index of the component's first pixel, -1 on background.
    Min-label propagation with pointer jumping, run until nothing changes.
    """
    b, h, w = classes.shape
    fg = classes >= 0
    big = b * h * w
    lab = torch.where(fg, torch.arange(big).view(b, h, w), torch.full_like(classes, big))
    same_v = fg[:, 1:] & (classes[:, 1:] == classes[:, :-1])
    same_h = fg[:, :, 1:] & (classes[:, :, 1:] == classes[:, :, :-1])
    while True:
        new = lab.clone()
        new[:, 1:] = torch.where(same_v, torch.minimum(new[:, 1:], lab[:, :-1]), new[:, 1:])
        new[:, :-1] = torch.where(same_v, torch.minimum(new[:, :-1], lab[:, 1:]), new[:, :-1])
        new[:, :, 1:] = torch.where(
            same_h, torch.minimum(new[:, :, 1:], lab[:, :, :-1]), new[:, :, 1:]
        )
        new[:, :, :-1] = torch.where(
            same_h, torch.minimum(new[:, :, :-1], lab[:, :, 1:]), new[:, :, :-1]
        )
        # Pointer jumping: adopt the label of one's label pixel (labels only ever decrease).
        flat = torch.cat([new.reshape(-1), torch.tensor([big])])
        new = torch.where(fg, flat[new], new)
        if torch.equal(new, lab):
            break
        lab = new
    return torch.where(fg, lab, torch.full_like(lab, -1))


def classify_shape(area: int, width: int, height: int, top: int, bottom: int) -> str | None:
    """Shape of a component from its area, box and the widths of its top and bottom rows."""
    if not 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
        return None
    fill = area / (width * height)
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    if fill >= MIN_FILL and bottom > top:
        return "triangle"
    return None


def detect_objects(images: torch.Tensor) -> list[list[Detection]]:
    """Objects in each image ([B, 3, H, W] in [0, 1]), in row-major order of first pixel."""
    images = images.detach().cpu()
    classes = pixel_classes(images)
    labels = connected_components(classes)
    b, h, w = classes.shape
    out: list[list[Detection]] = [[] for _ in range(b)]
    fg = labels >= 0
    if not fg.any():
        return out
    roots, comp = torch.unique(labels[fg], return_inverse=True)
    n = len(roots)
    ys, xs = torch.nonzero(fg, as_tuple=True)[1:]
    area = torch.bincount(comp, minlength=n)
    x0 = torch.full((n,), w).scatter_reduce(0, comp, xs, "amin")
    x1 = torch.full((n,), -1).scatter_reduce(0, comp, xs, "amax") + 1
    y0 = torch.full((n,), h).scatter_reduce(0, comp, ys, "amin")
    y1 = torch.full((n,), -1).scatter_reduce(0, comp, ys, "amax") + 1
    top = torch.bincount(comp, weights=(ys == y0[comp]).float(), minlength=n)
    bottom = torch.bincount(comp, weights=(ys == y1[comp] - 1).float(), minlength=n)
    cls = classes.reshape(-1)[roots]
    rows = zip(
        (roots // (h * w)).tolist(),
        area.tolist(),
        x0.tolist(),
        y0.tolist(),
        x1.tolist(),
        y1.tolist(),
        top.tolist(),
        bottom.tolist(),
        cls.tolist(),
    )
    for img, a, bx0, by0, bx1, by1, t, bt, c in rows:
        if a < MIN_AREA:
            continue
        shape = classify_shape(a, bx1 - bx0, by1 - by0, int(t), int(bt))
        colour = COLOURS[c] if c < UNKNOWN_COLOUR else None
        out[img].append(Detection(shape, colour, (bx0, by0, bx1, by1), a))
    return out


@functools.lru_cache(maxsize=4096)
def _spec(prompt: str) -> PromptSpec:
    return parse_prompt(prompt)


def check_prompt(prompt: str | PromptSpec, objects: list[Detection]) -> PromptCheck:
    """GenEval-style sub-conditions of one caption against one image's detections."""
    spec = _spec(prompt) if isinstance(prompt, str) else prompt
    conditions: dict[str, bool] = {}
    matches = []
    for i, g in enumerate(spec.groups):
        same_shape = [o for o in objects if o.shape == g.shape]
        match = [o for o in same_shape if o.colour == g.colour]
        matches.append(match)
        conditions[f"present[{i}]"] = len(same_shape) > 0
        if g.count > 1:
            conditions[f"count[{i}]"] = len(same_shape) == g.count
        conditions[f"colour[{i}]"] = len(match) >= g.count
    if spec.relation is not None:
        conditions["position"] = any(
            relation_holds(a.box, b.box, spec.relation) for a in matches[0] for b in matches[1]
        )
    conditions["exclusive"] = len(objects) == spec.n_objects
    return PromptCheck(spec.caption(), spec.skill, conditions)


def check_images(images: torch.Tensor, prompts: list[str]) -> list[PromptCheck]:
    """:func:`check_prompt` for each (image, prompt); images [B, 3, H, W] in [0, 1]."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return [check_prompt(p, d) for p, d in zip(prompts, detect_objects(images))]


def skill_summary(checks: list[PromptCheck]) -> dict[str, dict[str, float]]:
    """Per skill: ``strict`` accuracy, mean ``soft`` score, ``n``, and the pass rate of each
    kind of sub-condition (``present``, ``colour``, ``count``, ``position``, ``exclusive``).

    ``overall`` averages the skills present with equal weight (GenEval's overall score).
    """
    out: dict[str, dict[str, float]] = {}
    for skill in SKILLS:
        mine = [c for c in checks if c.skill == skill]
        if not mine:
            continue
        row = {
            "strict": sum(c.strict for c in mine) / len(mine),
            "soft": sum(c.soft for c in mine) / len(mine),
            "n": float(len(mine)),
        }
        kinds: dict[str, list[bool]] = {}
        for c in mine:
            for key, ok in c.conditions.items():
                kinds.setdefault(key.split("[")[0], []).append(ok)
        row.update({k: sum(v) / len(v) for k, v in sorted(kinds.items())})
        out[skill] = row
    if out:
        out["overall"] = {
            k: sum(r[k] for r in out.values()) / len(out) for k in ("strict", "soft")
        } | {"n": float(len(checks))}
    return out


def geneval_soft(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Fraction of the caption's sub-conditions the image satisfies, in [0, 1]."""
    return torch.tensor([c.soft for c in check_images(images, prompts)], dtype=torch.float32)


def geneval_strict(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """1 when the image satisfies every sub-condition of its caption, else 0."""
    return torch.tensor([float(c.strict) for c in check_images(images, prompts)])


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (both axes, all channels), per image."""
    images = images.float()
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return (dx + dy) / 2


#: Total variation at which ``shapes_smoothness`` reaches 0 (see :func:`smoothness`).
SMOOTHNESS_TV_ZERO = 0.25


def smoothness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``clip(1 - TV / SMOOTHNESS_TV_ZERO, 0, 1)``, a prompt-free image-quality proxy.

    It rewards flat regions and few edges: speckle and noise score low, a blank image scores
    1. Every object a caption asks for adds edges, so it pulls against ``shapes_geneval``.
    """
    return (1 - total_variation(images) / SMOOTHNESS_TV_ZERO).clamp(0, 1)
