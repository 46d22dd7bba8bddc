"""What every section shares: the user-facing error type and the strict base model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user."""


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number is never a meaningful setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
