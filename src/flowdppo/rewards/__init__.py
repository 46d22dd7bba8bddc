"""Rewards: callables that score decoded samples against their prompts.

A reward is ``fn(images, prompts) -> Tensor[B]`` with ``images`` in [0, 1], shape
[B, C, H, W], one prompt per image. Rewards are registered by name with a factory, so a
reward that loads weights does so once, when a run asks for it::

    @register_reward("brightness")
    def _make():
        return lambda images, prompts: images.mean(dim=(1, 2, 3))

A factory's keyword arguments are the reward's options: ``get_reward(name, **options)``,
set per run in the config as ``reward.options: {name: {key: value}}``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

Reward = Callable[[torch.Tensor, list[str]], torch.Tensor]

_FACTORIES: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Register a reward factory under ``name`` (a decorator)."""

    def wrap(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _FACTORIES:
            raise ValueError(f"reward {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return wrap


#: Rewards whose module is imported only when a run names them. None of these modules
#: needs transformers at import time; the model rewards import it when built.
_LAZY: dict[str, str] = {
    "clip_score": "flowdppo.rewards.vision",
    "pickscore": "flowdppo.rewards.vision",
    "aesthetic": "flowdppo.rewards.vision",
    "jpeg_compressibility": "flowdppo.rewards.vision",
    "jpeg_incompressibility": "flowdppo.rewards.vision",
    "http": "flowdppo.rewards.http",
}


def available_rewards() -> list[str]:
    _load_builtin()
    return sorted(set(_FACTORIES) | set(_LAZY))


def get_reward(name: str, **options: Any) -> Reward:
    """Build the reward registered as ``name``, passing ``options`` to its factory."""
    _load_builtin()
    if name not in _FACTORIES and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown reward {name!r}; available: {', '.join(available_rewards())}. "
            "Register your own with flowdppo.rewards.register_reward."
        )
    factory = _FACTORIES[name]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        accepted = _option_names(factory)
        raise ValueError(
            f"reward {name!r} does not take the options {sorted(options)}; it takes "
            f"{', '.join(accepted) if accepted else 'no options'} (set in reward.options.{name})"
        ) from None
    except ValueError:  # a builtin or C callable without a signature: let the call decide
        pass
    return factory(**options)


def _option_names(factory: Callable) -> list[str]:
    try:
        params = inspect.signature(factory).parameters.values()
    except ValueError:
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _load_builtin() -> None:
    # Built-in tasks register their rewards on import.
    from flowdppo import tasks  # noqa: F401
