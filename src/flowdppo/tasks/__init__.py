"""Built-in tasks: a base model, its rewards and its prompt split, by name.

A built-in task is a package (``digits``, ``shapes``, ``text``) with what is its own (data,
grammar, rewards, words) on top of the shared pieces: :mod:`.common` (weights files, the
pixel adapter, Euler sampling), :mod:`.blocks` (the conditioned flow transformer) and
:mod:`.pretraining` (the pretraining loop). Its package registers it with
:func:`register_builtin_task`. This module imports a task's package only when a run asks
for it: the tasks import this module, so importing them here would be a cycle.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowdppo import plugins
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

#: The built-in tasks and the packages that register them, imported on first use.
_BUILTIN: dict[str, str] = {
    "digits": "flowdppo.tasks.digits",
    "motion": "flowdppo.tasks.motion",
    "shapes": "flowdppo.tasks.shapes",
    "text": "flowdppo.tasks.text",
}


def register_task(name: str):
    def wrap(factory: Callable[[], Task]) -> Callable[[], Task]:
        _TASKS[name] = factory
        return factory

    return wrap


def register_builtin_task(
    name: str, package: str, *, default_rewards: list[str], description: str, **extra: Any
) -> None:
    """Register the task ``name`` made of the parts its ``package`` exports by these names:
    ``load_base_model`` (``build_model``), ``TRAIN_PROMPTS``, ``HELDOUT_PROMPTS``,
    ``LORA_TARGETS`` and ``pretrain``. ``extra`` adds to :attr:`Task.extra` (``threads``,
    ``recommended``, ``recommended_sde``, ``eval_group``, ...); every call gets its own copy.
    """

    def factory() -> Task:
        parts = importlib.import_module(package)
        return Task(
            name=name,
            build_model=parts.load_base_model,
            default_rewards=list(default_rewards),
            train_prompts=list(parts.TRAIN_PROMPTS),
            heldout_prompts=list(parts.HELDOUT_PROMPTS),
            description=description,
            extra={
                "lora_targets": list(parts.LORA_TARGETS),
                "pretrain": parts.pretrain,
                **copy.deepcopy(extra),
            },
        )

    register_task(name)(factory)


def available_tasks() -> list[str]:
    return sorted(set(_TASKS) | set(_BUILTIN))


def task_for_config(cfg) -> Task:
    """The run's task: a built-in one by name, or the "prompts" task made from the config
    (a diffusers model and prompt files, see :mod:`flowdppo.tasks.prompts`)."""
    if cfg.task == "prompts":
        from flowdppo.tasks.prompts import prompts_task

        return prompts_task(cfg)
    task = get_task(cfg.task)
    if cfg.data.train_prompts is not None or cfg.data.heldout_prompts is not None:
        from flowdppo.tasks.prompts import grammar_prompts

        grammar_prompts(task, cfg)
    if cfg.log.eval_prompts is not None:
        task.extra["eval_prompts"] = cfg.log.eval_prompts
    return task


def get_task(name: str) -> Task:
    if name == "prompts":
        raise ValueError(
            "task 'prompts' is made from a run's config (model.kind, model.path, "
            "data.train_prompts): use task_for_config(cfg)"
        )
    if not plugins.is_registered(name, _TASKS, _BUILTIN):
        raise ValueError(
            f"unknown task {name!r}; available: {', '.join(available_tasks())}, or prompts "
            "(a diffusers model on prompts from text files)"
        )
    return _TASKS[name]()
