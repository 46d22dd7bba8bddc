"""Rewards: callables that score decoded samples against their prompts.

A reward is ``fn(images, prompts) -> Tensor[B]`` with ``images`` in [0, 1], shape
[B, C, H, W], one prompt per image. Rewards are registered by name with a factory, so a
reward that loads weights does so once, when a run asks for it::

    @register_reward("brightness")
    def _make():
        return lambda images, prompts: images.mean(dim=(1, 2, 3))
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reward = Callable[[torch.Tensor, list[str]], torch.Tensor]

_FACTORIES: dict[str, Callable[[], Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[[], Reward]], Callable[[], Reward]]:
    """Register a reward factory under ``name`` (a decorator)."""

    def wrap(factory: Callable[[], Reward]) -> Callable[[], Reward]:
        if name in _FACTORIES:
            raise ValueError(f"reward {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return wrap


def available_rewards() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def get_reward(name: str) -> Reward:
    """Build the reward registered as ``name``."""
    _load_builtin()
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown reward {name!r}; available: {', '.join(sorted(_FACTORIES))}. "
            "Register your own with flowdppo.rewards.register_reward."
        )
    return _FACTORIES[name]()


def _load_builtin() -> None:
    # Built-in tasks register their rewards on import.
    from flowdppo import tasks  # noqa: F401
