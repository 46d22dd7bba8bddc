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

    def eval_split(self) -> tuple[list[str], list[str]]:
        """The trained and held-out prompts evaluation samples: all of them, or the first
        ``extra["eval_prompts"]`` of each (a task with thousands of prompts sets it)."""
        n = self.extra.get("eval_prompts")
        if n is None:
            return self.train_prompts, self.heldout_prompts
        return self.train_prompts[:n], self.heldout_prompts[:n]


_TASKS: dict[str, Callable[[], Task]] = {}


def register_task(name: str):
    def wrap(factory: Callable[[], Task]) -> Callable[[], Task]:
        _TASKS[name] = factory
        return factory

    return wrap


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def task_for_config(cfg) -> Task:
    """The run's task: a built-in one by name, or the "prompts" task made from the config
    (a diffusers model and prompt files, see :mod:`flowdppo.tasks.prompts`)."""
    if cfg.task == "prompts":
        from flowdppo.tasks.prompts import prompts_task

        return prompts_task(cfg)
    task = get_task(cfg.task)
    if cfg.log.eval_prompts is not None:
        task.extra["eval_prompts"] = cfg.log.eval_prompts
    return task


def get_task(name: str) -> Task:
    if name == "prompts":
        raise ValueError(
            "task 'prompts' is made from a run's config (model.kind, model.path, "
            "data.train_prompts): use task_for_config(cfg)"
        )
    if name not in _TASKS:
        raise ValueError(
            f"unknown task {name!r}; available: {', '.join(sorted(_TASKS))}, or prompts "
            "(a diffusers model on prompts from text files)"
        )
    return _TASKS[name]()


from flowdppo.tasks import digits, shapes, text  # noqa: E402,F401  (registers the built-in tasks)
