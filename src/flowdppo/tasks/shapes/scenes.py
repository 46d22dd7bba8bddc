"""Procedural scenes of the shapes task: layouts that satisfy a caption, and their rendering.

A scene is 1-4 flat-coloured objects (circle, square, triangle; pixel-exact 7x7 masks) on a
black 16x16 background, with at least one empty pixel between any two
bounding boxes. Layouts are drawn by rejection sampling from a ``numpy`` generator, so a seed
fixes the scene. Images are float32 RGB in [0, 1]; the model sees ``2 * image - 1``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from flowdppo.tasks.shapes.grammar import SKILLS, PromptSpec, parse_prompt, skill_prompts

IMAGE_SIZE = 16
#: Well separated, saturated colours: each has one dominant hue on a black background, so a
#: pixel's colour is recoverable from its chromaticity alone.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.85, 0.15),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
#: One size, 7 pixels: the largest of which four fit the 16x16 frame. Smaller objects are
#: ambiguous (a 5x5 pixel circle is a square less its four corners, fill 0.84), and an
#: even-sized pixel circle is either nearly a square (fill 0.89) or a cross.
OBJECT_SIZES: tuple[int, ...] = (7,)
#: Empty pixels required between two bounding boxes, so objects never touch.
GAP = 1
#: A relation in a rendered scene must hold with this much directional dominance (the
#: detector needs only 0.5), so ground truth is never borderline.
LAYOUT_DOMINANCE = 0.8
MAX_TRIES = 200


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape, colour and ``size`` x ``size`` box at column ``x``, row ``y``."""

    shape: str
    colour: str
    x: int
    y: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, end-exclusive."""
        return self.x, self.y, self.x + self.size, self.y + self.size


@functools.cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``size`` x ``size`` mask of a shape; every mask touches all four box sides."""
    c = np.arange(size) + 0.5
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        d = c - size / 2
        mask = d[:, None] ** 2 + d[None, :] ** 2 <= (size / 2) ** 2
    elif shape == "triangle":
        # Apex up: a pixel is in when its centre is inside the isosceles triangle.
        mask = np.abs(c[None, :] - size / 2) <= c[:, None] / 2 + 1e-9
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


def render(objects: list[SceneObject], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw objects on the background: float32 [3, H, W] in [0, 1]."""
    img = np.empty((3, image_size, image_size), dtype=np.float32)
    img[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    for o in objects:
        mask = shape_mask(o.shape, o.size)
        region = img[:, o.y : o.y + o.size, o.x : o.x + o.size]
        region[:, mask] = np.asarray(PALETTE[o.colour], dtype=np.float32)[:, None]
    return img


def direction(box_a: tuple, box_b: tuple) -> tuple[float, float] | None:
    """GenEval's relative-position direction of box ``a`` from box ``b``.

    The centre offset, shrunk per axis by 0.1 of the two boxes' summed extent, divided by
    the unshrunk offset's length; ``None`` when the shrunk offset vanishes (boxes too close
    to tell). Components below -0.5 mean left of / above, above 0.5 right of / below.
    """
    ax, ay = (box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2
    bx, by = (box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2
    dx, dy = ax - bx, ay - by
    norm = math.hypot(dx, dy)
    ext_x = (box_a[2] - box_a[0]) + (box_b[2] - box_b[0])
    ext_y = (box_a[3] - box_a[1]) + (box_b[3] - box_b[1])
    rx = max(abs(dx) - 0.1 * ext_x, 0.0) * math.copysign(1.0, dx)
    ry = max(abs(dy) - 0.1 * ext_y, 0.0) * math.copysign(1.0, dy)
    if abs(rx) < 1e-3 and abs(ry) < 1e-3:
        return None
    return rx / norm, ry / norm


def relation_holds(box_a: tuple, box_b: tuple, relation: str, dominance: float = 0.5) -> bool:
    """Whether ``a <relation> b`` holds (image rows grow downward)."""
    d = direction(box_a, box_b)
    if d is None:
        return False
    dx, dy = d
    return {
        "left of": -dx,
        "right of": dx,
        "above": -dy,
        "below": dy,
    }[relation] > dominance


def _free_corners(blocked: np.ndarray, size: int) -> np.ndarray:
    """``free[y, x]``: a ``size`` box with top-left corner (x, y) misses every blocked pixel."""
    n = blocked.shape[0] - size + 1
    ii = np.zeros((blocked.shape[0] + 1, blocked.shape[1] + 1), dtype=np.int32)
    ii[1:, 1:] = blocked.cumsum(0).cumsum(1)
    hits = ii[size:, size:] - ii[:n, size:] - ii[size:, :n] + ii[:n, :n]
    return hits == 0


def _relation_ok(anchor: SceneObject, size: int, relation: str, image_size: int) -> np.ndarray:
    """``ok[y, x]``: a ``size`` box at (x, y) is clearly ``relation`` of ``anchor``."""
    n = image_size - size + 1
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    ax0, ay0, ax1, ay1 = anchor.box
    dx = x + size / 2 - (ax0 + ax1) / 2
    dy = y + size / 2 - (ay0 + ay1) / 2
    norm = np.hypot(dx, dy)
    rx = np.maximum(np.abs(dx) - 0.1 * (size + ax1 - ax0), 0) * np.sign(dx)
    ry = np.maximum(np.abs(dy) - 0.1 * (size + ay1 - ay0), 0) * np.sign(dy)
    with np.errstate(invalid="ignore", divide="ignore"):
        comp = {"left of": -rx, "right of": rx, "above": -ry, "below": ry}[relation] / norm
    return np.nan_to_num(comp, nan=0.0) > LAYOUT_DOMINANCE


def layout(
    spec: PromptSpec, rng: np.random.Generator, image_size: int = IMAGE_SIZE
) -> list[SceneObject]:
    """A random non-overlapping placement of the objects ``spec`` asks for.

    Objects come in caption order (group 0's first), each placed uniformly among the corners
    still free; for a relation, the second object among those that satisfy it with margin.
    """
    wanted = [(g.shape, g.colour) for g in spec.groups for _ in range(g.count)]
    for _ in range(MAX_TRIES):
        objects: list[SceneObject] = []
        blocked = np.zeros((image_size, image_size), dtype=bool)
        # Four objects only fit as a 2x2 arrangement; sending each to its own quadrant
        # (in random order) avoids the many dead ends of free placement.
        quadrants = rng.permutation(4) if len(wanted) == 4 else None
        for i, (shape, colour) in enumerate(wanted):
            size = int(rng.choice(OBJECT_SIZES))
            free = _free_corners(blocked, size)
            if quadrants is not None:
                low = np.arange(free.shape[0]) <= image_size - 2 * size - GAP
                high = np.arange(free.shape[0]) >= size + GAP
                q = quadrants[i]
                free &= (high if q // 2 else low)[:, None] & (high if q % 2 else low)[None, :]
            if i == 1 and spec.relation is not None:
                # "A <relation> B" places B at the inverse relation of A (the test is
                # antisymmetric: direction(a, b) == -direction(b, a)).
                free &= _relation_ok(objects[0], size, _INVERSE[spec.relation], image_size)
            ys, xs = np.nonzero(free)
            if len(ys) == 0:
                break
            k = int(rng.integers(len(ys)))
            obj = SceneObject(shape, colour, int(xs[k]), int(ys[k]), size)
            objects.append(obj)
            x0, y0, x1, y1 = obj.box
            blocked[max(0, y0 - GAP) : y1 + GAP, max(0, x0 - GAP) : x1 + GAP] = True
        else:
            return objects
    raise RuntimeError(f"no layout found for {spec.caption()!r} in {MAX_TRIES} tries")


_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@functools.cache
def _skill_specs(skill: str) -> tuple[PromptSpec, ...]:
    return tuple(parse_prompt(p) for p in skill_prompts(skill))


def random_spec(rng: np.random.Generator, skills: tuple[str, ...] = SKILLS) -> PromptSpec:
    """A caption drawn uniformly over ``skills``, then uniformly within the skill."""
    specs = _skill_specs(skills[int(rng.integers(len(skills)))])
    return specs[int(rng.integers(len(specs)))]


def sample_scene(spec: PromptSpec | str, seed: int) -> tuple[list[SceneObject], np.ndarray]:
    """A scene for one caption, fixed by ``seed``: (objects, image in [0, 1])."""
    spec = parse_prompt(spec) if isinstance(spec, str) else spec
    objects = layout(spec, np.random.default_rng(seed))
    return objects, render(objects)


def scene_batch(
    n: int, rng: np.random.Generator, skills: tuple[str, ...] = SKILLS
) -> tuple[torch.Tensor, list[str]]:
    """``n`` random scenes with their captions: images [n, 3, H, W] in [-1, 1] (model scale)."""
    images = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    captions = []
    for i in range(n):
        spec = random_spec(rng, skills)
        images[i] = render(layout(spec, rng))
        captions.append(spec.caption())
    return torch.from_numpy(images) * 2 - 1, captions
