"""Exact scoring of the motion task: find the objects in every frame, track them, check the
caption.

Every frame goes through the shapes task's detector (:func:`~flowdppo.tasks.shapes.detect.
detect_objects`: palette colour per pixel, 4-connected components, shape from the fill of the
bounding box). A caption's object is then tracked through the frames: in each frame, the
detections of its colour and shape, the one nearest its box centre in the previous frame.

Sub-conditions, for object ``i`` of the caption, each the fraction of frames (or of
frame-to-frame steps) where it holds, so that a clip right in most frames earns most of the
credit; ``strict`` needs every one whole, ``soft`` is their mean:

* ``shape[i]``: the frames with an object of its shape;
* ``colour[i]``: the frames with an object of its shape *and* colour (the binding; a colour
  that changes mid-clip fails the frames after the change);
* ``size[i]`` (when the caption asks for one): the frames where the tracked box is that
  size (small: at most :data:`SMALL_MAX` pixels on its longer side);
* ``direction[i]`` (0 or 1): the net displacement between the first and last frames the
  object is found in points the asked way: at least one pixel along it, less across;
* ``speed[i]``: the frame-to-frame steps that move the asked speed along the direction,
  within :data:`STEP_TOLERANCE` pixels, and at most that across (a caption without a speed
  word takes the better of the two speeds). A frozen, skipped or shuffled frame breaks
  steps;

and for the clip, ``count``: the frames holding exactly the caption's objects and nothing
else (an extra object, moving or not, or a missing one fails them).
"""

from __future__ import annotations

import functools
import hashlib
from statistics import fmean

import torch

from flowdppo.tasks.motion.clips import DIRECTION_STEPS, SIZE_PIXELS, SPEED_PIXELS
from flowdppo.tasks.motion.grammar import GROUPS, MotionSpec, parse_prompt
from flowdppo.tasks.shapes.detect import Detection, PromptCheck, detect_objects

#: Largest box side (pixels) of a small object; larger is large (small 5, large 7).
SMALL_MAX = (SIZE_PIXELS["small"] + SIZE_PIXELS["large"]) // 2
#: Tolerance of a step's displacement, in pixels: box centres move in half pixels, so one
#: box edge off by a pixel is still the asked speed; half-way between two speeds is not.
STEP_TOLERANCE = 0.5
#: The attributes reported as sub-scores (the kinds of sub-condition).
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "direction", "speed", "count")


class ClipCheck(PromptCheck):
    """The sub-conditions of one caption on one clip (``skill``: its group, ``one`` or
    ``two`` objects), each the fraction of frames (or frame-to-frame steps) where it holds:
    ``soft`` is their mean, ``strict`` needs every one whole."""

    @property
    def strict(self) -> bool:
        return all(v >= 1 for v in self.conditions.values())

    @property
    def group(self) -> str:
        return self.skill

    def attribute(self, kind: str) -> float | None:
        """The pass rate of one kind of sub-condition (``colour``, ``speed``, ...), or None
        where the caption has none of that kind (a size it does not ask for)."""
        vals = [ok for key, ok in self.conditions.items() if key.split("[")[0] == kind]
        return sum(vals) / len(vals) if vals else None


def _centre(d: Detection) -> tuple[float, float]:
    x0, y0, x1, y1 = d.box
    return (x0 + x1) / 2, (y0 + y1) / 2


def _track(frames: list[list[Detection]], shape: str, colour: str) -> list[Detection | None]:
    """The object of ``shape`` and ``colour`` in each frame (None where a frame has none):
    where there are several, the one nearest its last position."""
    out: list[Detection | None] = []
    last: Detection | None = None
    for objects in frames:
        found = [o for o in objects if o.shape == shape and o.colour == colour]
        if found and last is not None:
            px, py = _centre(last)
            found.sort(key=lambda o: (_centre(o)[0] - px) ** 2 + (_centre(o)[1] - py) ** 2)
        out.append(found[0] if found else None)
        last = out[-1] or last
    return out


@functools.lru_cache(maxsize=8192)
def _spec(prompt: str) -> MotionSpec:
    return parse_prompt(prompt)


def _fraction(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def check_clip(prompt: str | MotionSpec, frames: list[list[Detection]]) -> ClipCheck:
    """The sub-conditions of one caption against one clip's detections, frame by frame."""
    spec = _spec(prompt) if isinstance(prompt, str) else prompt
    conditions: dict[str, float] = {}
    for i, obj in enumerate(spec.objects):
        conditions[f"shape[{i}]"] = _fraction(
            [any(o.shape == obj.shape for o in f) for f in frames]
        )
        track = _track(frames, obj.shape, obj.colour)
        conditions[f"colour[{i}]"] = _fraction([d is not None for d in track])
        if obj.size is not None:
            conditions[f"size[{i}]"] = _fraction(
                [
                    d is not None
                    and (max(d.box[2] - d.box[0], d.box[3] - d.box[1]) <= SMALL_MAX)
                    == (obj.size == "small")
                    for d in track
                ]
            )
        ux, uy = DIRECTION_STEPS[obj.direction]
        found = [(t, _centre(d)) for t, d in enumerate(track) if d is not None]
        # The net displacement between the first and last frames it is found in.
        (t0, (x0, y0)), (t1, (x1, y1)) = (found[0], found[-1]) if found else ((0, (0, 0)),) * 2
        along, across = (x1 - x0) * ux + (y1 - y0) * uy, abs((x1 - x0) * uy + (y1 - y0) * ux)
        conditions[f"direction[{i}]"] = float(t1 > t0 and along >= 1 and across < along)
        # Each frame-to-frame step, along the asked direction and across it (None where
        # either frame lacks the object).
        steps = [
            None
            if a is None or b is None
            else (
                (_centre(b)[0] - _centre(a)[0]) * ux + (_centre(b)[1] - _centre(a)[1]) * uy,
                abs((_centre(b)[0] - _centre(a)[0]) * uy)
                + abs((_centre(b)[1] - _centre(a)[1]) * ux),
            )
            for a, b in zip(track, track[1:])
        ]
        speeds = [SPEED_PIXELS[obj.speed]] if obj.speed else list(SPEED_PIXELS.values())
        conditions[f"speed[{i}]"] = max(
            _fraction(
                [
                    st is not None and abs(st[0] - v) <= STEP_TOLERANCE and st[1] <= STEP_TOLERANCE
                    for st in steps
                ]
            )
            for v in speeds
        )
    conditions["count"] = _fraction([len(f) == len(spec.objects) for f in frames])
    return ClipCheck(spec.caption(), spec.group, conditions)


def check_clips(clips: torch.Tensor, prompts: list[str]) -> list[ClipCheck]:
    """:func:`check_clip` for each (clip, prompt); clips [B, 3, F, H, W] in [0, 1]."""
    if clips.dim() != 5:
        raise ValueError(f"motion clips are [B, 3, F, H, W], got shape {tuple(clips.shape)}")
    if len(prompts) != clips.shape[0]:
        raise ValueError(f"{clips.shape[0]} clips but {len(prompts)} prompts")
    b, c, f, h, w = clips.shape
    frames = detect_objects(clips.detach().cpu().transpose(1, 2).reshape(b * f, c, h, w))
    return [check_clip(p, frames[i * f : (i + 1) * f]) for i, p in enumerate(prompts)]


def summary(checks: list[ClipCheck]) -> dict[str, dict[str, float]]:
    """Per group (``one``, ``two`` objects) and ``all``: ``strict`` accuracy, mean ``soft``
    score, ``n``, and the pass rate of each attribute (:data:`ATTRIBUTES`) over the clips
    whose caption has it."""
    out: dict[str, dict[str, float]] = {}
    for group in (*GROUPS, "all"):
        mine = [c for c in checks if group in ("all", c.group)]
        if not mine:
            continue
        row = {"strict": fmean(c.strict for c in mine), "soft": fmean(c.soft for c in mine)}
        row["n"] = float(len(mine))
        for kind in ATTRIBUTES:
            vals = [v for c in mine if (v := c.attribute(kind)) is not None]
            if vals:
                row[kind] = sum(vals) / len(vals)
        out[group] = row
    return out


class MotionReward:
    """A reward on clips: ``soft`` (the fraction of sub-conditions that hold, in [0, 1]) or
    strict (1 when all hold).

    ``components(clips, prompts)`` gives each sample's pass rate per attribute (NaN where its
    caption has no sub-condition of that kind), which the trainer logs beside the reward.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        # The checks of the last batch scored: the evaluator asks for the components of the
        # batch it has just scored.
        self._last: tuple[tuple, list[ClipCheck]] | None = None

    def checks(self, clips: torch.Tensor, prompts: list[str]) -> list[ClipCheck]:
        clips = clips.detach().cpu()
        key = (
            tuple(clips.shape),
            hashlib.sha1(clips.float().numpy().tobytes()).digest(),
            tuple(prompts),
        )
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        checks = check_clips(clips, prompts)
        self._last = (key, checks)
        return checks

    def __call__(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        checks = self.checks(clips, prompts)
        return torch.tensor(
            [float(c.strict) if self.strict else c.soft for c in checks], dtype=torch.float32
        )

    def components(self, clips: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        checks = self.checks(clips, prompts)
        nan = float("nan")
        return {
            kind: torch.tensor(
                [nan if (v := c.attribute(kind)) is None else v for c in checks],
                dtype=torch.float32,
            )
            for kind in ATTRIBUTES
        }
