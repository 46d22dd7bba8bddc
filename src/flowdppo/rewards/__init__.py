"""Rewards: callables that score decoded samples against their prompts.

A reward is ``fn(images, prompts) -> Tensor[B]`` with ``images`` in [0, 1], shape
[B, C, H, W], one prompt per image. Rewards are registered by name with a factory, so a
reward that loads weights does so once, when a run asks for it::

    @register_reward("brightness")
    def _make():
        return lambda images, prompts: images.mean(dim=(1, 2, 3))

A factory's keyword arguments are the reward's options: ``get_reward(name, **options)``,
set per run in the config as ``reward.options: {name: {key: value}}``.

A name with a colon, ``package.module:function``, is a factory found by its import path
instead of the registry (:mod:`flowdppo.plugins`), so a user's reward needs no
registration and no wrapper script.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from flowdppo import plugins

Reward = Callable[[torch.Tensor, list[str]], torch.Tensor]

_FACTORIES: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Register a reward factory under ``name`` (a decorator)."""

    def wrap(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _FACTORIES and not _same_definition(_FACTORIES[name], factory):
            raise ValueError(f"reward {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return wrap


def _same_definition(a: Callable, b: Callable) -> bool:
    # A module imported twice (reloaded in a notebook, or once as a plugin and once as a
    # script) registers its factory again: the same definition, not a clash of names.
    def key(f: Callable) -> tuple:
        return getattr(f, "__module__", None), getattr(f, "__qualname__", None)

    return key(a) == key(b) and "<lambda>" not in str(key(a)[1])


#: The built-in rewards and the modules that register them, imported only when a run names
#: one. None of these modules needs transformers at import time; the model rewards import it
#: when built. A task's rewards are registered by the task's own module: this package imports
#: no task to find them (the tasks import this package, so that would be a cycle).
_LAZY: dict[str, str] = {
    "digit_prob": "flowdppo.tasks.digits.rewards",
    "digit_smoothness": "flowdppo.tasks.digits.rewards",
    "shapes_geneval": "flowdppo.tasks.shapes.rewards",
    "shapes_strict": "flowdppo.tasks.shapes.rewards",
    "shapes_smoothness": "flowdppo.tasks.shapes.rewards",
    "clip_score": "flowdppo.rewards.vision",
    "pickscore": "flowdppo.rewards.vision",
    "aesthetic": "flowdppo.rewards.vision",
    "jpeg_compressibility": "flowdppo.rewards.vision",
    "jpeg_incompressibility": "flowdppo.rewards.vision",
    "http": "flowdppo.rewards.http",
    "ocr": "flowdppo.rewards.ocr",
    "vlm": "flowdppo.rewards.vlm",
}


def available_rewards() -> list[str]:
    return sorted(set(_FACTORIES) | set(_LAZY))


def reward_factory(name: str) -> Callable[..., Reward]:
    """The factory of a registered name or of a ``package.module:function`` import path."""
    if plugins.is_import_path(name):
        return plugins.resolve(name, "reward.names")
    if not plugins.is_registered(name, _FACTORIES, _LAZY):
        raise ValueError(
            f"unknown reward {name!r}; available: {', '.join(available_rewards())}. "
            "Register your own with flowdppo.rewards.register_reward (and list its module in "
            "reward.plugins), or name it by import path, package.module:function"
        )
    return _FACTORIES[name]


def get_reward(name: str, **options: Any) -> Reward:
    """Build the reward registered as ``name`` (or at the import path ``name``), passing
    ``options`` to its factory."""
    factory = reward_factory(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        accepted = _option_names(factory)
        required = [n for n in _required_names(factory) if n not in options]
        if required and not options:
            raise ValueError(
                f"reward {name!r} needs the arguments {required} to be built; reward.names "
                "takes a factory (its keyword arguments are the options, set in "
                f"reward.options), not the reward itself: if {name!r} is fn(images, "
                "prompts), name a function that returns it"
            ) from None
        raise ValueError(
            f"reward {name!r} does not take the options {sorted(options)}; it takes "
            f"{', '.join(accepted) if accepted else 'no options'} (set in reward.options.{name})"
        ) from None
    except ValueError:  # a builtin or C callable without a signature: let the call decide
        pass
    reward = factory(**options)
    if not callable(reward):
        raise ValueError(
            f"reward {name!r}: its factory returned a {type(reward).__name__}, not a callable; "
            "a factory returns the reward, fn(images, prompts) -> Tensor[B]"
        )
    return reward


def _option_names(factory: Callable) -> list[str]:
    try:
        params = inspect.signature(factory).parameters.values()
    except ValueError:
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _required_names(factory: Callable) -> list[str]:
    try:
        params = inspect.signature(factory).parameters.values()
    except ValueError:
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.default is p.empty]
