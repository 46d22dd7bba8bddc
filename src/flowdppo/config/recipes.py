"""Recipes: the YAML configs that ship inside the package, found by name from anywhere.

``sd3/grpo`` names ``flowdppo/recipes/sd3/grpo.yaml`` of the installed package; a path to
a file of one's own is read as a path. ``configs/sd3/grpo.yaml``, the form the docs use (in
a clone, ``configs`` links to ``src/flowdppo/recipes``), resolves to the same recipe from
any directory, with or without a clone.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from flowdppo.config.base import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
_KEY = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+$")


def recipe_names() -> list[str]:
    """Every shipped recipe's name (``digits/grpo``, ``experiments/table_digits``, ...)."""
    return sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in _files())


def _files() -> list[Path]:
    return [p for p in RECIPES.rglob("*.yaml") if p.is_file()]


def describe(name: str) -> str:
    """A recipe's first comment line (what it runs), or its name."""
    for line in (RECIPES / f"{name}.yaml").read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and text.strip("# "):
            return text.lstrip("# ").strip()
        if text and not text.startswith("#"):
            break
    return name


def resolve(spec: str | Path) -> Path:
    """The file ``spec`` names: a path that exists, else a shipped recipe by name (with or
    without ``configs/`` and ``.yaml``); anything else is one error saying what to write."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    name = text.removeprefix("./").removeprefix("configs/").removesuffix(".yaml")
    recipe = RECIPES / f"{name}.yaml"
    if recipe.is_file():
        return recipe
    if _KEY.match(text) and not text.endswith((".yaml", ".yml")):
        raise ConfigError(
            f"config file {text!r} does not exist; {text} looks like a config key: write "
            f"{text}=VALUE (no spaces around '=')"
        )
    close = difflib.get_close_matches(name, recipe_names(), n=1)
    hint = f" (did you mean the recipe {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"config file {text!r} does not exist, nor is it a recipe's name{hint}; "
        "`flowdppo recipes` lists the recipes"
    )
