"""The ``data`` section: prompt files of task ``prompts``."""

from __future__ import annotations

from pydantic import Field

from flowdppo.config.base import PathKey, _Section


class DataConfig(_Section):
    train_prompts: PathKey = Field(
        None, description="task prompts: text file, one training prompt per line"
    )
    heldout_prompts: PathKey = Field(
        None, description="task prompts: text file of prompts never trained on (optional)"
    )
    eval_prompts: int = Field(
        8, ge=1, description="task prompts: evaluate on the first N prompts of each file"
    )
