"""Procedural clips of the motion task: trajectories that satisfy a caption, and their frames.

A clip is :data:`FRAMES` frames of :data:`FRAME_SIZE` x :data:`FRAME_SIZE` RGB: one or two
flat-coloured shapes (the shapes task's pixel-exact masks and palette) on black, each moving
in a straight line at a whole number of pixels per frame, with at least one empty pixel
between any two objects in every frame. Trajectories are drawn by rejection sampling from a
``numpy`` generator, so a seed fixes the clip. Clips are float32 [3, F, H, W] in [0, 1] (the
video layout of the trainer's grids); the model sees ``2 * clip - 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from flowdppo.tasks.motion.grammar import (
    DIRECTIONS,
    SIZES,
    SPEEDS,
    MotionSpec,
    MovingObject,
    parse_prompt,
)
from flowdppo.tasks.shapes.grammar import COLOURS, SHAPES
from flowdppo.tasks.shapes.scenes import SceneObject, render

FRAMES = 8
FRAME_SIZE = 24
CLIP_SHAPE = (3, FRAMES, FRAME_SIZE, FRAME_SIZE)
#: Box side of each size in pixels. 5 and 7 are the odd sizes whose circle, square and
#: triangle masks the shapes detector tells apart (fill 0.84, 1.0, 0.52 at 5).
SIZE_PIXELS: dict[str, int] = {"small": 5, "large": 7}
#: Pixels per frame of each speed. A large fast object crosses 7 + 2 x 7 = 21 of the 24
#: pixels of the frame.
SPEED_PIXELS: dict[str, int] = {"slowly": 1, "fast": 2}
#: Unit step of each direction, (dx, dy): image rows grow downward.
DIRECTION_STEPS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
#: Where trajectories start (:func:`_start`): the middle frame within ALONG_JITTER pixels of
#: the centre along the motion, and one of three lanes (LANE_MARGIN pixels from either edge,
#: or centred) within CROSS_JITTER pixels across it. Uniform starts over the whole frame gave
#: a base model that drew fragments everywhere: in 1,000 steps it could not learn so many
#: places at once (docs/motion-task.md).
ALONG_JITTER = 2
CROSS_JITTER = 1
LANE_MARGIN = 2
#: Empty pixels required between two boxes in every frame, so objects never touch.
GAP = 1
MAX_TRIES = 500


@dataclass(frozen=True)
class Track:
    """One object's trajectory: its box at column ``x``, row ``y`` in the first frame, moving
    ``(dx, dy)`` pixels per frame."""

    shape: str
    colour: str
    size: int
    x: int
    y: int
    dx: int
    dy: int

    def at(self, t: int) -> SceneObject:
        return SceneObject(
            self.shape, self.colour, self.x + t * self.dx, self.y + t * self.dy, self.size
        )


def _separated(a: Track, b: Track, frames: int) -> bool:
    for t in range(frames):
        ax0, ay0, ax1, ay1 = a.at(t).box
        bx0, by0, bx1, by1 = b.at(t).box
        apart_x = ax1 + GAP <= bx0 or bx1 + GAP <= ax0
        apart_y = ay1 + GAP <= by0 or by1 + GAP <= ay0
        if not (apart_x or apart_y):
            return False
    return True


def _start_range(step: int, size: int, frames: int, frame_size: int) -> tuple[int, int]:
    """Start coordinates (low, high inclusive) that keep every frame's box inside the frame."""
    travel = step * (frames - 1)
    return max(0, -travel), frame_size - size - max(0, travel)


def _start(rng: np.random.Generator, step: int, size: int, frames: int, frame_size: int) -> int:
    """A start coordinate on one axis. Along the motion (``step`` != 0): the middle of the
    trajectory near the frame's centre (:data:`ALONG_JITTER`). Across it: one of three lanes
    (:data:`LANE_MARGIN` from either edge, or centred), give or take :data:`CROSS_JITTER`."""
    lo, hi = _start_range(step, size, frames, frame_size)
    if hi < lo:
        raise ValueError(f"a {size}-pixel object at {abs(step)} pixels per frame leaves the frame")
    if step:
        centre, jitter = (lo + hi) / 2, ALONG_JITTER
    else:
        lanes = (LANE_MARGIN, (frame_size - size) / 2, frame_size - size - LANE_MARGIN)
        centre, jitter = lanes[int(rng.integers(len(lanes)))], CROSS_JITTER
    low, high = max(lo, math.ceil(centre - jitter)), min(hi, math.floor(centre + jitter))
    if low > high:  # no jitter around a half-pixel centre
        low = high = min(hi, math.floor(centre))
    return int(rng.integers(low, high + 1))


def track_for(
    obj: MovingObject,
    rng: np.random.Generator,
    *,
    speed: int | None = None,
    frames: int = FRAMES,
    frame_size: int = FRAME_SIZE,
) -> Track:
    """A random trajectory of one object: the size and speed it asks for (either, drawn
    uniformly, where it does not ask), a start that keeps it in the frame (:func:`_start`).
    ``speed`` overrides the speed in pixels per frame (the tests' wrong-speed clips)."""
    size = SIZE_PIXELS[obj.size or SIZES[int(rng.integers(len(SIZES)))]]
    if speed is None:
        speed = SPEED_PIXELS[obj.speed or SPEEDS[int(rng.integers(len(SPEEDS)))]]
    ux, uy = DIRECTION_STEPS[obj.direction]
    dx, dy = ux * speed, uy * speed
    x, y = (_start(rng, d, size, frames, frame_size) for d in (dx, dy))
    return Track(obj.shape, obj.colour, size, x, y, dx, dy)


def layout(
    spec: MotionSpec | str,
    rng: np.random.Generator,
    *,
    speeds: tuple[int | None, ...] | None = None,
    frames: int = FRAMES,
    frame_size: int = FRAME_SIZE,
) -> list[Track]:
    """Random trajectories of the objects a caption asks for, apart in every frame."""
    spec = parse_prompt(spec) if isinstance(spec, str) else spec
    speeds = speeds or (None,) * len(spec.objects)
    for _ in range(MAX_TRIES):
        tracks = [
            track_for(o, rng, speed=v, frames=frames, frame_size=frame_size)
            for o, v in zip(spec.objects, speeds)
        ]
        if all(_separated(a, b, frames) for i, a in enumerate(tracks) for b in tracks[i + 1 :]):
            return tracks
    raise RuntimeError(f"no trajectories found for {spec.caption()!r} in {MAX_TRIES} tries")


def render_clip(
    tracks: list[Track], frames: int = FRAMES, frame_size: int = FRAME_SIZE
) -> np.ndarray:
    """The frames of some trajectories: float32 [3, F, H, W] in [0, 1]."""
    return np.stack([render([tr.at(t) for tr in tracks], frame_size) for t in range(frames)], 1)


def sample_clip(spec: MotionSpec | str, seed: int) -> tuple[list[Track], np.ndarray]:
    """A clip for one caption, fixed by ``seed``: (trajectories, clip in [0, 1])."""
    tracks = layout(spec, np.random.default_rng(seed))
    return tracks, render_clip(tracks)


def random_object(rng: np.random.Generator) -> MovingObject:
    """An object drawn uniformly over the grammar (size and speed left out a third of the
    time each)."""
    sizes, speeds = (None, *SIZES), (None, *SPEEDS)
    return MovingObject(
        SHAPES[int(rng.integers(len(SHAPES)))],
        COLOURS[int(rng.integers(len(COLOURS)))],
        DIRECTIONS[int(rng.integers(len(DIRECTIONS)))],
        sizes[int(rng.integers(len(sizes)))],
        speeds[int(rng.integers(len(speeds)))],
    )


def random_spec(rng: np.random.Generator) -> MotionSpec:
    """A caption of the whole grammar (both splits): one or two objects, equally often."""
    first = random_object(rng)
    if rng.random() < 0.5:
        return MotionSpec((first,))
    while True:
        second = random_object(rng)
        if (second.colour, second.shape) != (first.colour, first.shape):
            return MotionSpec((first, second))


def clip_batch(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """``n`` random clips with their captions: [n, 3, F, H, W] in [-1, 1] (model scale)."""
    clips = np.empty((n, *CLIP_SHAPE), dtype=np.float32)
    captions = []
    for i in range(n):
        spec = random_spec(rng)
        clips[i] = render_clip(layout(spec, rng))
        captions.append(spec.caption())
    return torch.from_numpy(clips) * 2 - 1, captions
