"""Reward-KL frontiers at matched KL, on hand-made run results with known curves."""

import math
from types import SimpleNamespace

import pytest

from flowdppo.compare.experiment import load_experiment
from flowdppo.compare.frontier import (
    HELDOUT_KEY,
    KL_KEY,
    TRAIN_KEY,
    frontier_markdown,
    frontier_table,
    value_at_kl,
)
from flowdppo.config import ConfigError


def _run(algorithm, seed, slope, kl_end, frontier="I=1", heldout_slope=-1.0):
    """A run whose gain grows as slope x KL (x 1e-3) up to kl_end, evaluated at 4 points."""
    rows = []
    for f in (0.25, 0.5, 0.75, 1.0):
        kl = f * kl_end
        rows.append(
            {KL_KEY: kl * 1e-3, TRAIN_KEY: 0.5 + slope * kl, HELDOUT_KEY: 0.6 + heldout_slope * kl}
        )
    spec = SimpleNamespace(algorithm=algorithm, seed=seed, frontier=frontier)
    return SimpleNamespace(
        ok=True,
        status=SimpleNamespace(spec=spec),
        rows=rows,
        before={TRAIN_KEY: 0.5, HELDOUT_KEY: 0.6},
    )


def test_value_at_kl_interpolates_from_the_base_model():
    run = _run("dppo", 0, slope=0.02, kl_end=40.0)
    assert value_at_kl(run, 5.0) == pytest.approx(0.1)  # between iteration 0 and the first eval
    assert value_at_kl(run, 25.0) == pytest.approx(0.5)
    assert value_at_kl(run, 25.0, HELDOUT_KEY) == pytest.approx(-25.0)
    assert math.isnan(value_at_kl(run, 41.0))  # never reached


def test_frontier_is_the_best_setting_per_seed_at_levels_both_reach():
    runs = []
    for seed in (0, 1, 2):
        # dppo: a tight setting (steep, low reach) and a loose one (shallow, far reach)
        runs += [_run("dppo", seed, 0.03, 20.0), _run("dppo", seed, 0.01, 80.0)]
        runs += [_run("grpo", seed, 0.01 + 0.001 * seed, 40.0), _run("grpo", seed, 0.005, 60.0)]
    rows = frontier_table(runs, ["dppo", "grpo"])
    # The highest KL every (algorithm, seed) frontier reaches is grpo's 60.
    assert [r["level"] for r in rows] == pytest.approx([7.5, 15.0, 30.0, 60.0])
    at15 = rows[1]
    assert at15["dppo"][0] == pytest.approx(0.45)  # the tight setting wins at low KL
    assert at15["grpo"][0] == pytest.approx(0.15 + 0.015)  # mean of 0.15, 0.165, 0.18
    assert at15["difference"][0] == pytest.approx(0.45 - 0.165)
    assert at15["dppo/heldout"][0] == pytest.approx(-15.0)  # the winning run's held-out change
    at60 = rows[3]
    assert at60["dppo"][0] == pytest.approx(0.6)  # only the loose dppo setting reaches 60
    assert at60["grpo"][0] == pytest.approx(0.3)
    lines = frontier_markdown(rows)
    assert (
        lines[0].startswith("## Frontiers")
        and len([x for x in lines if x.startswith("| I=1")]) == 4
    )


def test_runs_outside_a_frontier_are_not_in_the_table():
    assert frontier_table([_run("dppo", 0, 0.01, 10.0, frontier=None)], ["dppo"]) == []


def test_frontier_label_must_be_a_non_empty_string(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "task: digits\ntrain: {iterations: 2}\ncompare:\n  variants:\n"
        "    - {label: a, overrides: {train.lr: 1.0e-3}, frontier: ''}\n"
    )
    with pytest.raises(ConfigError, match="frontier"):
        load_experiment(path)


def test_compare_of_swept_settings_writes_the_frontier_table_and_plot(tmp_path, toy_overrides):
    from test_compare import _experiment

    from flowdppo.compare import compare

    variants = [
        {
            "label": f"d{i}",
            "overrides": {"objective.dppo_threshold": t},
            "algorithms": ["dppo"],
            "frontier": "I=1",
        }
        for i, t in enumerate((1e-5, 1e-3))
    ] + [
        {
            "label": f"e{i}",
            "overrides": {"objective.clip_range": c},
            "algorithms": ["grpo"],
            "frontier": "I=1",
        }
        for i, c in enumerate((1e-3, 1e-1))
    ]
    overrides = toy_overrides + ["log.eval_every=1", "train.iterations=3"]
    path = _experiment(
        tmp_path, overrides, {"algorithms": ["dppo", "grpo"], "seeds": [0], "variants": variants}
    )
    code, _ = compare(path, out=tmp_path / "out", jobs=0, echo=lambda s: None)
    assert code == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Frontiers at matched KL" in md and md.count("\n| I=1 |") == 4
    assert (tmp_path / "out" / "frontiers.png").read_bytes()[:4] == b"\x89PNG"


def test_frontiers_of_different_methods_share_one_table():
    # one frontier per method's own knob (sweep_guard_nft_digits.yaml): guard alone, nft alone
    runs = [_run("guard", s, 0.02, 30.0, frontier="guard") for s in (0, 1)]
    runs += [_run("nft", s, 0.01, 50.0, frontier="nft") for s in (0, 1)]
    rows = frontier_table(runs, ["guard", "nft"])
    assert {r["frontier"] for r in rows} == {"guard", "nft"}
    lines = frontier_markdown(rows)
    header = next(x for x in lines if x.startswith("| frontier"))
    assert "guard gain" in header and "nft gain" in header and "difference" not in header
    guard_row = next(x for x in lines if x.startswith("| guard"))
    assert guard_row.count(" - ") == 2  # no nft gain or held-out on the guard frontier
