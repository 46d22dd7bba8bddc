"""Built-in tasks: a base model, its rewards and its prompt split, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flowdppo.models.base import FlowModel


@dataclass
class Task:
    name: str
    #: ``build_model(weights_path or None)``: loads the shipped base model when ``None``.
    build_model: Callable[[str | None], FlowModel]
    #: Reward names (see ``flowdppo.rewards``) used when the config names none.
    default_rewards: list[str]
    train_prompts: list[str]
    #: Prompts never trained on, for the out-of-domain (forgetting) metrics.
    heldout_prompts: list[str]
    description: str = ""
    extra: dict = field(default_factory=dict)


_TASKS: dict[str, Callable[[], Task]] = {}


def register_task(name: str):
    def wrap(factory: Callable[[], Task]) -> Callable[[], Task]:
        _TASKS[name] = factory
        return factory

    return wrap


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]()


from flowdppo.tasks import digits, shapes  # noqa: E402,F401  (registers the built-in tasks)
