"""User code a run loads by name: modules to import first, and objects by import path.

``reward.plugins: [module, ...]`` are imported before a run builds its task, model and
rewards, so a module that registers a reward, a task or a model adapter on import works
from the command line. ``reward.names`` also accepts ``package.module:function``, a reward
factory found by its import path. Both are recorded in the run's ``config.yaml``, so a
resumed, evaluated or sampled run imports the same code again.

Modules are looked up on ``sys.path`` with the current directory first, as
``python -m`` does: the console script ``flowdppo`` otherwise sees only its own ``bin/``,
and ``my_reward.py`` next to the user's config would not be found.

Every failure is a :class:`PluginError` (a ``ValueError``, so the command line prints it as
one ``error:`` line, exit 2) naming the config key, the path and what to do.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any


class PluginError(ValueError):
    """User code named by the config could not be loaded."""


def _cwd_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_module(module: str, key: str) -> ModuleType:
    """``importlib.import_module(module)``, every failure a :class:`PluginError` naming ``key``."""
    if not module or any(not part.isidentifier() for part in module.split(".")):
        raise PluginError(
            f"{key}: {module!r} is not a module name (dotted Python identifiers, e.g. my_rewards "
            "or mypkg.rewards)"
        )
    _cwd_on_path()
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        where = (
            "it is not on the Python path: run from the directory that holds it, set "
            "PYTHONPATH, or pip install its package"
            if missing == module or module.startswith(f"{missing}.")
            else f"it imports {missing!r}, which is not installed"
        )
        raise PluginError(f"{key}: cannot import module {module!r}: {where}") from None
    except Exception as exc:
        raise PluginError(
            f"{key}: importing module {module!r} raised {type(exc).__name__}: {exc}; fix the "
            "module (python -c 'import " + module + "' shows the traceback)"
        ) from None


def load_plugins(modules: list[str]) -> None:
    """Import every module of ``reward.plugins`` (once; Python caches the import)."""
    for module in modules:
        import_module(module, "reward.plugins")


def is_registered(name: str, registry: dict[str, Any], lazy: dict[str, str]) -> bool:
    """Whether ``name`` is in ``registry``, after importing the module ``lazy`` names for it:
    built-in tasks and rewards register on import, when a run first asks for them."""
    if name not in registry and name in lazy:
        importlib.import_module(lazy[name])
    return name in registry


def is_import_path(name: str) -> bool:
    return ":" in name


def resolve(path: str, key: str) -> Any:
    """The callable at ``package.module:attribute`` (the attribute may be dotted)."""
    module, _, attr = path.partition(":")
    if not module or not attr or ":" in attr or not all(a.isidentifier() for a in attr.split(".")):
        raise PluginError(
            f"{key}: {path!r} is not an import path of the form package.module:function "
            "(or a registered reward's name)"
        )
    obj: Any = import_module(module, key)
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            found = ".".join([module] + attr.split(".")[:i])
            raise PluginError(
                f"{key}: {path!r}: {found!r} has no attribute {part!r}; check the name after "
                "the colon"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(
            f"{key}: {path!r} is an object of type {type(obj).__name__}, not callable; it must "
            "name a reward factory, a function whose keyword arguments are the reward's options "
            "and which returns fn(images, prompts) -> Tensor[B]"
        )
    return obj


def load_user_code(reward_cfg) -> None:
    """A run's ``reward.plugins`` imported and its import-path rewards found: every mistake
    in either is reported here, before a model loads or a file is written."""
    load_plugins(reward_cfg.plugins)
    for name in reward_cfg.names:
        if is_import_path(name):
            resolve(name, "reward.names")
