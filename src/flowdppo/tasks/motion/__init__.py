"""The built-in "motion" task: short clips of moving shapes, scored exactly frame by frame.

* prompts: one or two shapes with a colour, an optional size, a direction and an optional
  speed, ``a small yellow circle moving down fast``; captions with a held-out shape-direction
  pair are held out (:mod:`.grammar`);
* clips: 8 frames of 24x24 RGB (d = 13,824 latent elements), flat shapes on black moving in
  straight lines (:mod:`.clips`);
* rewards (:mod:`.score`): ``motion`` (the fraction of the caption's sub-conditions that
  hold: shapes, colours, sizes, direction, speed, count, found by the shapes task's detector
  in every frame and tracked across frames) and ``motion_strict`` (all of them).

See ``docs/motion-task.md``.
"""

from __future__ import annotations

from flowdppo.rewards import Reward, register_reward
from flowdppo.tasks.motion.score import MotionReward


@register_reward("motion")
def _make_motion() -> Reward:
    return MotionReward()


@register_reward("motion_strict")
def _make_motion_strict() -> Reward:
    return MotionReward(strict=True)
