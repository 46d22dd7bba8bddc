"""The shapes task's rewards, by name (:mod:`flowdppo.rewards` imports this module when a run
names one of them): ``shapes_geneval``, ``shapes_strict`` and ``shapes_smoothness``, all of
:mod:`.detect`."""

from __future__ import annotations

from flowdppo.rewards import Reward, register_reward
from flowdppo.tasks.shapes.detect import geneval_soft, geneval_strict, smoothness


@register_reward("shapes_geneval")
def make_geneval() -> Reward:
    return geneval_soft


@register_reward("shapes_strict")
def make_strict() -> Reward:
    return geneval_strict


@register_reward("shapes_smoothness")
def make_smoothness() -> Reward:
    return smoothness
