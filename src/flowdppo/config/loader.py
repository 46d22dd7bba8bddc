"""Reading a config: YAML files, dotted ``key=value`` overrides, merging, and writing one back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from flowdppo.config import recipes
from flowdppo.config.base import ConfigError
from flowdppo.config.errors import _explain
from flowdppo.config.run import Config


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"override {dotted!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
            )
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-3", "algorithm=grpo"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.iterations=20)"
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
        _set_path(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# Byte-order marks of the encodings a text editor may save a file in, longest first.
_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    name = repr(str(path))
    if path.is_dir():
        raise ConfigError(f"config file {name} is a directory, not a YAML file")
    if not path.exists():
        raise ConfigError(f"config file {name} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {name} cannot be read: {exc.strerror or exc}") from exc
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), None)
    if encoding is not None:
        raise ConfigError(
            f"config file {name} is {encoding} text; flowdppo reads UTF-8: save it as UTF-8 "
            f"(e.g. iconv -f {encoding.split()[0]} -t UTF-8)"
        )
    if b"\x00" in raw:
        raise ConfigError(
            f"config file {name} holds NUL bytes: it is UTF-16 or UTF-32 without a byte-order "
            "mark, or not text at all; save it as UTF-8"
        )
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is harmless: accept it
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {name} is not valid YAML: {exc}") from exc
    if data is None:
        # An empty file is more often a failed write or the wrong path than a wish for the
        # defaults, which `flowdppo train` with no file gives; `{}` says it on purpose.
        raise ConfigError(
            f"config file {name} is empty (no keys); to run the defaults give no config "
            "file, or write {} in it"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {name} must hold a mapping of keys, got {type(data).__name__}"
        )
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    sde_base: dict | None = None,
) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and overrides.

    Precedence, lowest first: the defaults, ``base`` (a task's recommended settings), the
    YAML file, the overrides. ``sde_base`` joins ``base`` when the resulting method samples
    with SDE steps (a task's rollout settings that an ODE-kernel method cannot take, such
    as ``sampler.shared_prefix``).
    """
    overrides = list(overrides or [])
    if path is not None:
        path = recipes.resolve(path)
    own = read_yaml(path) if path is not None else {}
    if "compare" in own:
        raise ConfigError(
            f"{path} is an experiment (it has a compare section), not a run config: run it "
            f"with `flowdppo compare {path}`"
        )
    ours = parse_overrides(overrides)

    def tree(under: dict) -> dict:
        return _merge(_merge(under, own), ours)

    origin = str(path) if path else "the task's recommended settings" if base else "defaults"
    try:
        cfg = Config.model_validate(tree(base or {}))
        if sde_base and cfg.kernel != "ode":
            cfg = Config.model_validate(tree(_merge(base or {}, sde_base)))
        return cfg
    except ValidationError as err:
        source = _source_of(err, origin, overrides)
        raise ConfigError(f"invalid configuration ({source}):\n  {_explain(err)}") from None


def _source_of(err: ValidationError, origin: str, overrides: list[str]) -> str:
    """Where the values behind ``err`` came from: the overrides that set an offending key,
    else the file (or the defaults); a check across sections names both."""
    keys = {item: item.partition("=")[0].split(".") for item in overrides}
    blamed, unblamed = [], False
    across = any(not e["loc"] for e in err.errors())
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # An override sets the offending key, a key inside it, or the section holding it.
        hits = [item for item, key in keys.items() if loc and key[: len(loc)] == loc[: len(key)]]
        blamed += [h for h in hits if h not in blamed]
        unblamed = unblamed or not hits
    if not blamed:
        return f"{origin} with overrides {', '.join(overrides)}" if across and overrides else origin
    head = f"override{'s' if len(blamed) > 1 else ''} {', '.join(blamed)}"
    return f"{head}; {origin}" if unblamed else head


def config_from_dict(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration ({source}):\n  {_explain(err)}") from None


def dump_config(cfg: Config) -> str:
    # Only a DiffusionNFT run records the nft section (every other method refuses it).
    exclude = None if cfg.objective_name == "nft" else {"nft"}
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=exclude), sort_keys=False)


def explain_config(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by its description (``flowdppo train
    --print-config``): what ``config.yaml`` would hold, with the meaning of every key."""
    data = yaml.safe_load(dump_config(cfg))
    lines: list[str] = []

    def walk(model, values: dict, indent: str) -> None:
        fields = type(model).model_fields
        for key, value in values.items():
            info = fields.get(key)
            note = f"  # {info.description}" if info is not None and info.description else ""
            child = getattr(model, key, None)
            if isinstance(value, dict) and isinstance(child, BaseModel):
                lines.append(f"{indent}{key}:{note}")
                walk(child, value, indent + "  ")
                continue
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
            text = text.removesuffix("\n...").strip()
            lines.append(f"{indent}{key}: {text}{note}")

    walk(cfg, data, "")
    return "\n".join(lines) + "\n"
