"""The ``data`` section: prompt files of task ``prompts`` (and of a built-in task with a
grammar, motion, whose every line must parse)."""

from __future__ import annotations

from pydantic import Field

from flowdppo.config.base import PathKey, _Section


class DataConfig(_Section):
    train_prompts: PathKey = Field(
        None,
        description="task prompts (or a built-in task with a grammar): text file, one "
        "training prompt per line",
    )
    heldout_prompts: PathKey = Field(
        None,
        description="task prompts (or a built-in task with a grammar): text file of prompts "
        "never trained on (optional)",
    )
    eval_prompts: int = Field(
        8, ge=1, description="task prompts: evaluate on the first N prompts of each file"
    )
