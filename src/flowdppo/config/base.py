"""What every section shares: the user-facing error type and the strict base model."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user."""


def _expand_user(value: str | None) -> str | None:
    """``~`` or ``~user`` at the start of a path key, expanded as ``model.path`` always was
    (a shell leaves ``log.run_dir=~/runs/x`` alone: the tilde is not at a word's start)."""
    if value is None or not value.startswith("~"):
        return value
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        user = value[1:].split("/", 1)[0]
        why = f"there is no user {user!r}" if user else "no home directory is known (HOME unset)"
        raise ValueError(f"cannot expand {value!r}: {why}")
    return expanded


#: A config key that names a file or directory.
PathKey = Annotated[str | None, AfterValidator(_expand_user)]


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number is never a meaningful setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
