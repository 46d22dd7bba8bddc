"""An experiment: a base run config, the algorithms, the seeds and the settings it varies.

An experiment file is an ordinary run config (every key of ``flowdppo train``) with one
extra top-level section, ``compare``::

    name: multi-epoch-digits
    task: digits
    train: {iterations: 200, group_size: 8}
    compare:
      algorithms: [dppo, grpo, cps, guard, nft, dppo+cps]
      seeds: 3                       # or a list: [0, 1, 2]
      variants:                      # optional; each a label and overrides
        - {label: "G=8 I=1", overrides: {train.inner_epochs: 1}}
        - {label: "G=8 I=2", overrides: {train.inner_epochs: 2}}
        - {label: "thr=1e-5", overrides: {objective.dppo_threshold: 1.0e-5}, algorithms: [dppo]}
        - {label: "I=2 clip=10", overrides: {objective.clip_range_per_step: 10}, frontier: "I=2"}
      per_algorithm:                 # optional; one method's own wiring, in every variant
        nft: {nft.rollout_model: old, sampler.solver: dpm2}
      quick: {train.iterations: 40}  # applied with --quick
      probe: ratio_noise             # optional extra measurement (see ratio_noise.py)
      compute_budget: 2.0e6          # optional; forward-equivalents (see compute.py)
      kl_bound: 5                    # optional; KL to the reference in 1e-3 per SDE step, or none

``per_algorithm`` holds the settings that make a method the method its authors run (the
released trainer's wiring: which model samples, which solver, which steps): they apply to
every run of that algorithm, on top of the shared settings, and a variant's overrides
(the knob it varies) apply on top of them.

Variants that share a ``frontier`` label are settings of one knob swept to trace a
reward-KL frontier (e.g. thresholds and clip ranges at two inner epochs): the report
compares the algorithms' frontiers at matched KL to the reference.

A plain run config (no ``compare`` section) is an experiment with the default algorithms,
three seeds and no variants. Every run's config is resolved and validated before any run
starts, so a typo fails in a second, not after an hour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowdppo.config import (
    PAPER_ALGORITHMS,
    Config,
    ConfigError,
    config_from_dict,
    drop_foreign_options,
    parse_algorithm,
    read_yaml,
    recipes,
)

DEFAULT_ALGORITHMS = PAPER_ALGORITHMS  # the six methods of the paper's comparison table
DEFAULT_SEEDS = 3
PROBES = ("ratio_noise",)
_COMPARE_KEYS = {
    "algorithms",
    "seeds",
    "variants",
    "quick",
    "probe",
    "description",
    "per_algorithm",
    "compute_budget",
    "kl_bound",
}
# compare keys a command line may set (compare.kl_bound=3): how the report reads the runs.
_CLI_COMPARE_KEYS = ("compute_budget", "kl_bound")
_VARIANT_KEYS = {"label", "overrides", "algorithms", "frontier"}
# Keys compare sets itself for every run; an override of them would be silently lost.
_OWNED = {"algorithm": "--algorithms", "train.seed": "--seeds", "log.run_dir": "--out"}


@dataclass
class Variant:
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value
    algorithms: list[str] | None = None  # None: the experiment's
    frontier: str | None = None  # the swept frontier this setting is a point of


@dataclass
class RunSpec:
    """One training run of the experiment: a variant, an algorithm and a seed."""

    group: str  # the label its seeds are aggregated under
    variant: str
    algorithm: str
    seed: int
    config: Config
    run_dir: Path
    frontier: str | None = None

    @property
    def run_id(self) -> str:
        return f"{_slug(self.group)}-seed{self.seed}"


@dataclass
class Experiment:
    name: str
    description: str
    base: dict  # the run-config tree, quick and command-line overrides applied
    algorithms: list[str]
    seeds: list[int]
    variants: list[Variant]
    probe: str | None
    quick: bool
    source: str
    per_algorithm: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted overrides
    compute_budget: float | None = None  # forward-equivalents; None: the smallest total
    kl_bound: float | str | None = None  # x 1e-3; None: the median; "none": no bound

    def algorithms_of(self, variant: Variant) -> list[str]:
        """A variant's own algorithms, restricted to the experiment's (or --algorithms)."""
        if variant.algorithms is None:
            return list(self.algorithms)
        return [a for a in variant.algorithms if a in self.algorithms]

    def groups(self) -> list[str]:
        """Group labels in plan order (variant-major)."""
        seen: list[str] = []
        for v in self.variants:
            for a in self.algorithms_of(v):
                label = group_label(a, v.label)
                if label not in seen:
                    seen.append(label)
        return seen

    def plan(self, out_dir: str | Path) -> list[RunSpec]:
        """Every run, its config resolved and validated (a ConfigError names the run)."""
        out_dir = Path(out_dir)
        runs = []
        for v in self.variants:
            for algorithm in self.algorithms_of(v):
                label = group_label(algorithm, v.label)
                for seed in self.seeds:
                    own = _tree(self.per_algorithm.get(algorithm, {}))
                    tree = _merge(_merge(self.base, own), _tree(v.overrides))
                    run_dir = out_dir / "runs" / f"{_slug(label)}-seed{seed}"
                    tree = _merge(
                        tree,
                        {
                            "algorithm": algorithm,
                            "name": f"{self.name}-{_slug(label)}-seed{seed}",
                            "train": {"seed": seed},
                            "log": {"run_dir": str(run_dir)},
                        },
                    )
                    # The shared settings hold every method's knobs; each run keeps its own.
                    tree = drop_foreign_options(tree)
                    cfg = config_from_dict(tree, source=f"{self.source}, run {label!r} seed {seed}")
                    runs.append(RunSpec(label, v.label, algorithm, seed, cfg, run_dir, v.frontier))
        if not runs:
            raise ConfigError(
                f"{self.source}: no run left: no variant uses any of the algorithms "
                f"{self.algorithms}"
            )
        return runs


def group_label(algorithm: str, variant: str) -> str:
    return f"{algorithm} [{variant}]" if variant else algorithm


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("_")


def _tree(dotted: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in dotted.items():
        parts = str(key).split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def parse_seeds(value: int | str | list) -> list[int]:
    """``3`` -> [0, 1, 2]; ``"0,5,7"`` or ``[0, 5, 7]`` -> [0, 5, 7]."""
    if isinstance(value, bool):
        raise ConfigError(f"seeds must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(
                f"seeds must be a count of at least 1, got {value} (for seed 0 alone pass a "
                "list: --seeds 0,)"
            )
        return list(range(value))
    items = [s for s in value.split(",") if s.strip()] if isinstance(value, str) else value
    try:
        seeds = [int(str(s).strip()) for s in items]
    except (TypeError, ValueError):
        raise ConfigError(
            f"seeds must be a count (3) or a comma-separated list of integers (0,5,7), got "
            f"{value!r}"
        ) from None
    if isinstance(value, str) and "," not in value and len(seeds) == 1:
        return parse_seeds(seeds[0])  # "--seeds 3" is a count
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and non-empty, got {value!r}")
    return seeds


def parse_algorithms(value: str | list) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    algorithms = [str(a).strip() for a in items if str(a).strip()]
    if not algorithms:
        raise ConfigError("algorithms is empty: name at least one, e.g. dppo,grpo")
    for a in algorithms:
        try:
            parse_algorithm(a)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if len(set(algorithms)) != len(algorithms):
        raise ConfigError(f"algorithms lists one twice: {algorithms}")
    return algorithms


def _dotted_overrides(mapping: Any, where: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(
            f"{where} must be a mapping of dotted keys to values, e.g. "
            f"{{train.inner_epochs: 2}}, got {mapping!r}"
        )
    return _flatten(_tree({str(k): v for k, v in mapping.items()}))


def _variants(raw: Any, source: str) -> list[Variant]:
    if raw is None:
        return [Variant("")]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: compare.variants must be a non-empty list")
    out, labels = [], set()
    for i, item in enumerate(raw):
        where = f"{source}: compare.variants[{i}]"
        if not isinstance(item, dict) or "label" not in item:
            raise ConfigError(f"{where} must be a mapping with a label and overrides")
        extra = set(item) - _VARIANT_KEYS
        if extra:
            raise ConfigError(f"{where} has unknown keys {sorted(extra)}; use {_VARIANT_KEYS}")
        label = str(item["label"])
        if not label or label in labels:
            raise ConfigError(f"{where}: label {label!r} is empty or used twice")
        labels.add(label)
        overrides = _dotted_overrides(item.get("overrides"), f"{where}.overrides")
        for key in overrides:
            if key in _OWNED:
                raise ConfigError(f"{where} sets {key}; variants cannot (use {_OWNED[key]})")
        algs = item.get("algorithms")
        frontier = item.get("frontier")
        if frontier is not None and not (isinstance(frontier, str) and frontier):
            raise ConfigError(f"{where}.frontier must be a non-empty label, got {frontier!r}")
        out.append(Variant(label, overrides, parse_algorithms(algs) if algs else None, frontier))
    return out


def parse_cli_overrides(items: list[str]) -> dict[str, Any]:
    flat = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            flat[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
    return flat


def load_experiment(
    path: str | Path,
    *,
    algorithms: str | list | None = None,
    seeds: int | str | list | None = None,
    quick: bool = False,
    overrides: list[str] | None = None,
) -> Experiment:
    """Read an experiment (or plain run config) file; command-line values take precedence."""
    source = str(path)
    tree = read_yaml(recipes.resolve(path))
    section = tree.pop("compare", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: the compare section must be a mapping")
    unknown = set(section) - _COMPARE_KEYS
    if unknown:
        raise ConfigError(
            f"{source}: unknown keys {sorted(unknown)} in compare; valid: {sorted(_COMPARE_KEYS)}"
        )
    cli = _dotted_overrides(parse_cli_overrides(overrides or []), "overrides")
    for key in [k for k in cli if k.startswith("compare.")]:
        name = key.removeprefix("compare.")
        if name not in _CLI_COMPARE_KEYS:
            raise ConfigError(
                f"override {key}: only compare.{' and compare.'.join(_CLI_COMPARE_KEYS)} may "
                "be set on the command line; edit the experiment file for the rest"
            )
        section[name] = cli.pop(key)
    for key in cli:
        if key in _OWNED:
            raise ConfigError(f"override {key} is set by compare itself; use {_OWNED[key]}")
    variants = _variants(section.get("variants"), source)
    for v in variants:
        clash = sorted(set(cli) & set(v.overrides))
        if clash:
            raise ConfigError(
                f"override {clash[0]} is what variant {v.label!r} of {source} varies; "
                "drop it from the command line or edit the variants"
            )
    quick_overrides = _dotted_overrides(section.get("quick"), f"{source}: compare.quick")
    if quick and not quick_overrides:
        raise ConfigError(f"{source} has no compare.quick section, so --quick would do nothing")
    base = _merge({"log": {"tensorboard": False}}, tree)
    if quick:
        base = _merge(base, _tree(quick_overrides))
    base = _merge(base, _tree(cli))
    per_algorithm = _per_algorithm(section.get("per_algorithm"), source)
    probe = section.get("probe")
    if probe is not None and probe not in PROBES:
        raise ConfigError(f"{source}: compare.probe {probe!r} is unknown; valid: {PROBES}")
    return Experiment(
        name=str(tree.get("name", Path(path).stem)),
        description=str(section.get("description", "")).strip(),
        base=base,
        algorithms=parse_algorithms(
            algorithms if algorithms is not None else section.get("algorithms", DEFAULT_ALGORITHMS)
        ),
        seeds=parse_seeds(seeds if seeds is not None else section.get("seeds", DEFAULT_SEEDS)),
        variants=variants,
        probe=probe,
        quick=quick,
        source=source,
        per_algorithm=per_algorithm,
        compute_budget=_compute_budget(section.get("compute_budget"), source),
        kl_bound=_kl_bound(section.get("kl_bound"), source),
    )


def _number(value: Any) -> Any:
    """A number given as text on the command line (1e6, which YAML reads as text)."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _compute_budget(value: Any, source: str) -> float | None:
    if value is None:
        return None
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(
            f"{source}: compare.compute_budget must be a positive number of training "
            f"forward-equivalents (e.g. 2.0e6), got {value!r}; leave it out for the smallest "
            "total of any run"
        )
    return float(value)


def _kl_bound(value: Any, source: str) -> float | str | None:
    if value is None or value == "none":
        return value
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(
            f"{source}: compare.kl_bound must be a KL to the reference x 1e-3 (e.g. 5 for "
            f"0.005) or none, got {value!r}; leave it out for the median over groups"
        )
    return float(value)


def _per_algorithm(raw: Any, source: str) -> dict[str, dict[str, Any]]:
    where = f"{source}: compare.per_algorithm"
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must map algorithm names to overrides, e.g. {{nft: {{...}}}}")
    out = {}
    for name, mapping in raw.items():
        (algorithm,) = parse_algorithms([str(name)])
        overrides = _dotted_overrides(mapping, f"{where}.{algorithm}")
        for key in overrides:
            if key in _OWNED:
                raise ConfigError(f"{where}.{algorithm} sets {key}; it cannot (use {_OWNED[key]})")
        out[algorithm] = overrides
    return out
