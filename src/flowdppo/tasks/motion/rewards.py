"""The motion task's rewards, by name (:mod:`flowdppo.rewards` imports this module when a run
names one of them): ``motion`` (soft, in [0, 1]) and ``motion_strict`` (pass / fail), both
:class:`~.score.MotionReward`."""

from __future__ import annotations

from flowdppo.rewards import Reward, register_reward
from flowdppo.tasks.motion.score import MotionReward


@register_reward("motion")
def make_motion() -> Reward:
    return MotionReward()


@register_reward("motion_strict")
def make_motion_strict() -> Reward:
    return MotionReward(strict=True)
