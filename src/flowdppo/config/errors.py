"""The error explainer: a pydantic ValidationError as one line per problem, keys named."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError

from flowdppo.config.run import Config


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            section = _section_model(loc[:-1])
            options = list(section.model_fields)
            lines.append(
                f"unknown key {key!r}{_suggest(str(loc[-1]), options)}; valid keys here: "
                f"{', '.join(options)}"
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) or "got" in msg else f" (got {got!r})"
            lines.append(f"{key}: {msg}{shown}" if key else msg)
    return "\n  ".join(lines)
