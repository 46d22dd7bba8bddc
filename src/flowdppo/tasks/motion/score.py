"""Exact scoring of the motion task: find the objects in every frame, track them, check the
caption.

Every frame goes through the shapes task's detector (:func:`~flowdppo.tasks.shapes.detect.
detect_objects`: palette colour per pixel, 4-connected components, shape from the fill of the
bounding box). A caption's object is then tracked through the frames: in each frame, the
detections of its colour and shape, the one nearest its box centre in the previous frame.

Sub-conditions (each a named boolean; ``strict`` needs all, ``soft`` is their mean), for
object ``i`` of the caption:

* ``shape[i]``: an object of its shape in every frame;
* ``colour[i]``: an object of its shape *and* colour in every frame (the binding; a colour
  that changes mid-clip fails it);
* ``size[i]`` (when the caption asks for one): the tracked box is that size in every frame
  (small: at most :data:`SMALL_MAX` pixels on its longer side);
* ``direction[i]``: the track's net displacement points the asked way: at least one pixel
  along it, and less across than along;
* ``speed[i]``: every frame-to-frame step moves the asked speed along the direction, within
  :data:`STEP_TOLERANCE` pixels, and at most that across (a caption without a speed word
  accepts either speed, the same in every step). A frozen frame, a skipped one or shuffled
  frames break it;

and for the clip, ``count``: every frame holds exactly the caption's objects and nothing else
(an extra object, moving or not, or a missing one fails it).
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
    ``two`` objects); ``strict`` and ``soft`` as the shapes task's."""

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


def _track(frames: list[list[Detection]], shape: str, colour: str) -> list[Detection] | None:
    """The object of ``shape`` and ``colour`` through the frames (nearest to its previous
    position where there are several); None where a frame has none."""
    out: list[Detection] = []
    for objects in frames:
        found = [o for o in objects if o.shape == shape and o.colour == colour]
        if not found:
            return None
        if out:
            px, py = _centre(out[-1])
            found.sort(key=lambda o: (_centre(o)[0] - px) ** 2 + (_centre(o)[1] - py) ** 2)
        out.append(found[0])
    return out


@functools.lru_cache(maxsize=8192)
def _spec(prompt: str) -> MotionSpec:
    return parse_prompt(prompt)


def check_clip(prompt: str | MotionSpec, frames: list[list[Detection]]) -> ClipCheck:
    """The sub-conditions of one caption against one clip's detections, frame by frame."""
    spec = _spec(prompt) if isinstance(prompt, str) else prompt
    conditions: dict[str, bool] = {}
    for i, obj in enumerate(spec.objects):
        conditions[f"shape[{i}]"] = all(any(o.shape == obj.shape for o in f) for f in frames)
        track = _track(frames, obj.shape, obj.colour)
        conditions[f"colour[{i}]"] = track is not None
        if obj.size is not None:
            conditions[f"size[{i}]"] = track is not None and all(
                (max(d.box[2] - d.box[0], d.box[3] - d.box[1]) <= SMALL_MAX)
                == (obj.size == "small")
                for d in track
            )
        ux, uy = DIRECTION_STEPS[obj.direction]
        if track is None:
            conditions[f"direction[{i}]"] = conditions[f"speed[{i}]"] = False
            continue
        centres = [_centre(d) for d in track]
        # Displacements along the asked direction and across it.
        steps = [
            ((x1 - x0) * ux + (y1 - y0) * uy, abs((x1 - x0) * uy) + abs((y1 - y0) * ux))
            for (x0, y0), (x1, y1) in zip(centres, centres[1:])
        ]
        along = sum(s[0] for s in steps)
        across = abs((centres[-1][0] - centres[0][0]) * uy + (centres[-1][1] - centres[0][1]) * ux)
        conditions[f"direction[{i}]"] = along >= 1 and across < along
        speeds = [SPEED_PIXELS[obj.speed]] if obj.speed else list(SPEED_PIXELS.values())
        conditions[f"speed[{i}]"] = any(
            all(abs(a - v) <= STEP_TOLERANCE and c <= STEP_TOLERANCE for a, c in steps)
            for v in speeds
        )
    conditions["count"] = all(len(f) == len(spec.objects) for f in frames)
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
