"""Property-based fuzzing of the configuration (hypothesis).

Random mutations of a valid configuration (unknown keys, wrong types, out-of-range or
non-finite numbers, sections replaced by scalars, malformed YAML) must end in a
``ConfigError`` whose message names a mutated key, and on the command line in exit
status 2 with an ``error:`` message and no traceback, or in a valid configuration. A
second property runs the valid mutations of a small toy configuration end to end: each
run finishes or stops with a clear error, never with an exception from deep inside.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flowdppo import cli
from flowdppo.config import Config, ConfigError, load_config


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(prefix + (name,))  # the section itself can be replaced too
            out.extend(_leaves(ann, prefix + (name,)))
        else:
            out.append(prefix + (name,))
    return out


KEYS = _leaves(Config)

WILD = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[path[-1]] = value


@st.composite
def mutations(draw, values=WILD, keys=KEYS):
    """A list of (key path, value or DELETE) edits."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "set", "set", "unknown", "delete"]))
        if kind == "unknown":
            section = draw(st.sampled_from([(), ("train",), ("sampler",), ("log",)]))
            name = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10))
            edits.append((section + (name,), draw(values)))
        else:
            key = draw(st.sampled_from(keys))
            edits.append((key, None if kind == "delete" else draw(values), kind == "delete"))
    return edits


def _apply(tree: dict, edits) -> tuple[dict, list[str]]:
    names = []
    for edit in edits:
        path, value = edit[0], edit[1]
        names.append(path[-1])
        if len(edit) == 3 and edit[2]:
            node = tree
            for part in path[:-1]:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(path[-1], None)
        else:
            _set(tree, path, value)
    return tree, names


def _base() -> dict:
    return Config().model_dump(mode="json")


def _cli_error(path: Path) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = cli.main(["train", str(path)])
    return code, buf.getvalue()


@settings(max_examples=150, deadline=None)
@given(edits=mutations())
def test_random_mutations_end_in_a_clear_error_or_a_valid_config(edits):
    tree, names = _apply(_base(), edits)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(tree))
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            assert any(n in str(exc) for n in names), str(exc)
            # On the command line: exit status 2, an "error:" message, no traceback.
            code, err = _cli_error(path)
            assert code == 2 and err.startswith("error: ") and "Traceback" not in err
            assert any(n in err for n in names), err
            return
    assert isinstance(cfg, Config)


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=60), cut=st.integers(0, 400))
def test_malformed_yaml_is_a_clear_error(text, cut):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        # A valid file cut at a random point with random text spliced in.
        good = yaml.safe_dump(_base())
        path.write_text(good[:cut] + text + good[cut:])
        try:
            load_config(path)
        except ConfigError:
            code, err = _cli_error(path)
            assert code == 2 and err.startswith("error: ") and "Traceback" not in err


@settings(max_examples=80, deadline=None)
@given(items=st.lists(st.text(max_size=20), min_size=1, max_size=3))
def test_random_override_strings_are_a_clear_error_or_valid(items):
    try:
        assert isinstance(load_config(None, items), Config)
    except ConfigError as exc:
        assert str(exc)


SMALL = st.sampled_from(
    [-1, 0, 1, 2, 3, 8, 0.5, 1e-3, 1.5, -0.5, True, False, None, "x", "toy", "lora", "full"]
    + ["gdpo", "group", "cosine", "linear", "sum", "cps", "dppo+cps", "grpo", "kl"]
    + [[0.0, 0.5], [0.5, 0.4], [1.5, 0.9], [0.9, 0.999], [], ["inp"], ["toy_brightness"]]
    + [["toy_brightness", "toy_contrast"], ["nope"], {"toy_brightness": 2.0}, {"x": 1.0}]
)
RUN_KEYS = [k for k in KEYS if k not in {("log", "run_dir"), ("log",)}]


@settings(max_examples=40, deadline=None)
@given(edits=mutations(values=SMALL, keys=RUN_KEYS))
def test_valid_mutations_of_a_toy_run_train_or_stop_clearly(edits):
    from conftest import TOY

    from flowdppo.config import parse_overrides

    tree, names = _apply(parse_overrides(TOY), edits)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(tree))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["train", str(path), f"log.run_dir={Path(tmp) / 'run'}"])
        if code == 2:
            message = err.getvalue()
            assert message.startswith("error: ") and "Traceback" not in message
            assert any(n in message for n in names), message
        else:
            assert code == 0 and "(ODE samples, fixed noise)" in out.getvalue()


@pytest.mark.parametrize(
    "override,key",
    [
        # Found by the properties above, or their neighbours: each used to pass validation
        # and fail later inside torch, or fail with a message that did not name the key.
        ("train.adam_betas=[1.5, 0.9]", "train.adam_betas"),
        ("train.seed=-1", "train.seed"),
        (f"train.seed={2**64}", "train.seed"),
        ("train.lr=.nan", "train.lr"),
        ("sampler.eta=.inf", "sampler.eta"),
        ("objective.dppo_threshold=.inf", "objective.dppo_threshold"),
        ("sampler.num_steps=2", "sampler.num_steps"),
        ("reward.max_invalid_fraction=1", "reward.max_invalid_fraction"),
        ("train.max_skipped_steps=-1", "train.max_skipped_steps"),
    ],
)
def test_examples_the_fuzzing_found(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
