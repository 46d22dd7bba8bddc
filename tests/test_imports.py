"""The package's import graph: no cycle among module-level imports, and the lazy registries
(built-in tasks and rewards, imported by name on first use) name modules that register what
they say."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import flowdppo
from flowdppo import rewards, tasks

SRC = Path(flowdppo.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package)."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def _top_level_imports(body: list[ast.stmt]):
    """Import statements that run when the module is imported: at the top level, and inside
    top-level ``if``/``try`` blocks, but not under ``if TYPE_CHECKING``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _top_level_imports(node.body)
            yield from _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level_imports(block)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level.

    ``from a.b import c`` counts as an import of ``a.b.c`` when that is a module, else of
    ``a.b``. A module's parent packages are left out: Python runs them first, and a package
    that imports its own submodules is not a cycle.
    """
    modules = _modules()
    graph = {}
    for name, (path, package) in modules.items():
        here = name if package else name.rpartition(".")[0]
        deps = set()
        for node in _top_level_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
                continue
            base = node.module or ""
            if node.level:
                parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                deps.add(sub if sub in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(_path_within(graph, component, v))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _path_within(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    # Breadth-first from start back to start inside the component: a shortest cycle.
    paths = {w: [start, w] for w in graph[start] & component}
    while start not in paths:
        paths = {
            w: p + [w] for p in paths.values() for w in graph[p[-1]] & component if w not in p[1:]
        }
    return paths[start]


def test_the_checker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "flowdppo.trainer.loop" in graph and len(graph) > 50  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_rewards_import_no_task():
    graph = import_graph()
    for name, deps in graph.items():
        if name == "flowdppo.rewards" or name.startswith("flowdppo.rewards."):
            assert not any(d.startswith("flowdppo.tasks") for d in deps), (name, deps)
    source = (SRC / "rewards" / "__init__.py").read_text()
    assert "import tasks" not in source and "from flowdppo.tasks" not in source


def test_lazy_rewards_are_registered_by_the_modules_named():
    for name, module in rewards._LAZY.items():
        importlib.import_module(module)
        assert name in rewards._FACTORIES, f"{module} does not register reward {name!r}"
        assert rewards._FACTORIES[name].__module__ == module


@pytest.mark.parametrize(
    ("name", "default_reward", "model_class"),
    [
        ("digits", "digit_prob", "DigitsModel"),
        ("motion", "motion", "MotionModel"),
        ("shapes", "shapes_geneval", "ShapesModel"),
        ("text", "ocr", "TextModel"),
    ],
)
def test_builtin_tasks_are_registered_by_their_packages(name, default_reward, model_class):
    package = importlib.import_module(tasks._BUILTIN[name])
    assert name in tasks._TASKS, f"{package.__name__} does not register task {name!r}"
    task = tasks.get_task(name)
    assert task.name == name and task.default_rewards == [default_reward]
    assert default_reward in rewards.available_rewards()
    assert task.train_prompts == list(package.TRAIN_PROMPTS)
    assert task.heldout_prompts == list(package.HELDOUT_PROMPTS)
    assert task.extra["lora_targets"] == package.LORA_TARGETS
    assert task.extra["pretrain"] is package.pretrain
    # The tiny digits and motion networks keep one thread; shapes and text follow the idle
    # cores (trainer/threads.py).
    assert task.extra["threads"] == {"digits": 1, "motion": 1}.get(name, "auto")
    # Each Task is a fresh copy: a run's changes to it reach no other run.
    task.extra.setdefault("recommended", {})["x"] = 1
    assert "x" not in tasks.get_task(name).extra.get("recommended", {})
    assert isinstance(task.build_model(None), getattr(package, model_class))
