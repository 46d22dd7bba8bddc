"""Reward against compute, on hand-made run results with known counters and curves."""

import math
from types import SimpleNamespace

import pytest

from flowdppo.compare.compute import at_budget, best_line, compute_view, forward_equivalents, points
from flowdppo.compare.experiment import load_experiment
from flowdppo.compare.frontier import KL_KEY, TRAIN_KEY
from flowdppo.config import ConfigError


def _run(per_iteration: dict, gains: list[float], kls: list[float], counters: bool = True):
    """A finished run evaluated after every iteration: ``per_iteration`` forward samples per
    phase each iteration, the evaluation gains and KLs (x 1e-3) after each."""
    rows = []
    for i, (gain, kl) in enumerate(zip(gains, kls), start=1):
        row = {"iteration": i, TRAIN_KEY: 0.5 + gain, KL_KEY: kl * 1e-3}
        row.update({"time/rollout": 1.0, "time/reward": 0.5, "time/update": 2.0, "time/eval": 9})
        if counters:
            row.update({f"forward_samples/{p}": n * i for p, n in per_iteration.items()})
            row["backward_calls"] = i
        rows.append(row)
    return SimpleNamespace(ok=True, rows=rows, before={TRAIN_KEY: 0.5}, values={"gain": gains[-1]})


# A ratio method: rollout 50 samples, update 50 forwards + 50 backwards; the evaluation
# and the logged KL to the reference are measurements, not training.
CHEAP = {"rollout": 50, "update": 50, "eval": 1000, "ref_kl": 100}  # 200 per iteration
# Twice the update (two inner epochs) and an old-model forward: 100 + 100 + 2 x 100 + 100.
DEAR = {"rollout": 100, "update": 100, "update_old": 100, "eval": 1000}  # 500 per iteration


def test_forward_equivalents_count_backwards_twice_and_leave_out_measurements():
    assert forward_equivalents({f"forward_samples/{p}": n for p, n in CHEAP.items()}) == 200
    assert forward_equivalents({f"forward_samples/{p}": n for p, n in DEAR.items()}) == 500
    assert math.isnan(forward_equivalents({"backward_calls": 3}))
    pts = points(_run(CHEAP, [0.1, 0.2, 0.3], [1, 2, 3]))
    assert [p.fe for p in pts] == [0, 200, 400, 600]
    assert [p.wall_s for p in pts] == pytest.approx([0, 3.5, 7.0, 10.5])
    assert [p.gain for p in pts] == pytest.approx([0, 0.1, 0.2, 0.3])


def test_gain_and_kl_at_a_budget_interpolate_between_evaluations():
    pts = points(_run(DEAR, [0.2, 0.3], [4, 6]))  # evaluations at 500 and 1000
    assert at_budget(pts, 250) == pytest.approx((0.1, 2.0))  # from iteration 0
    assert at_budget(pts, 750) == pytest.approx((0.25, 5.0))
    assert at_budget(pts, 5000) == pytest.approx((0.3, 6.0))  # ended below: its last


def test_best_at_equal_compute_within_the_kl_bound():
    cheap = [_run(CHEAP, [0.1, 0.2, 0.3 + s], [1, 2, 3]) for s in (0.0, 0.02)]
    dear = [_run(DEAR, [0.5, 0.6], [10, 12]) for _ in range(2)]
    steady = [_run(DEAR, [0.15, 0.3], [1, 2]) for _ in range(2)]
    groups = {"grpo": cheap, "nft [I=2]": dear, "dppo [I=2]": steady}
    view = compute_view(groups)
    # The budget is the smallest total (600, the cheap runs'); at 600 the dear runs are a
    # fifth of the way from their first evaluation (500) to their second (1000).
    assert view.budget == 600 and view.budget_source.startswith("the smallest")
    assert view.rows["nft [I=2]"]["gain_at_budget"][0] == pytest.approx(0.52)
    assert view.rows["nft [I=2]"]["kl_at_budget"][0] == pytest.approx(10.4)
    assert view.rows["grpo"]["gain_at_budget"] == pytest.approx((0.31, 0.02**0.5 / 10))
    assert view.rows["dppo [I=2]"]["forward_equivalents"] == pytest.approx((1000, 0))
    assert cheap[0].values["train_wall_s"] == pytest.approx(10.5)
    # The default bound, the median KL at the budget (3 of grpo, 1.2 of dppo, 10.4), rules
    # out the highest gain: grpo's +0.31 beats dppo's +0.18 within it.
    assert view.kl_bound == pytest.approx(3.0) and view.best == "grpo"
    assert "grpo, gain +0.310" in best_line(view) and "median" in best_line(view)
    assert compute_view(groups, kl_bound="none").best == "nft [I=2]"
    tight = compute_view(groups, kl_bound=1.0)
    assert tight.best is None and "no group stays within" in best_line(tight)
    assert compute_view(groups, budget=1000, kl_bound=5.0).best == "grpo"  # its last, +0.31
    old = {"grpo": [_run(CHEAP, [0.1], [1], counters=False)]}
    assert compute_view(old) is None and "no forward_samples" in best_line(None)


def test_budget_and_bound_are_checked_and_settable_on_the_command_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("task: digits\ntrain: {iterations: 2}\ncompare: {kl_bound: none}\n")
    assert load_experiment(path).kl_bound == "none"
    exp = load_experiment(path, overrides=["compare.kl_bound=2.5", "compare.compute_budget=1e6"])
    assert exp.kl_bound == 2.5 and exp.compute_budget == 1e6
    with pytest.raises(ConfigError, match="compute_budget must be a positive number"):
        load_experiment(path, overrides=["compare.compute_budget=0"])
    with pytest.raises(ConfigError, match="kl_bound must be a KL"):
        load_experiment(path, overrides=["compare.kl_bound=low"])
    with pytest.raises(ConfigError, match="only compare.compute_budget and compare.kl_bound"):
        load_experiment(path, overrides=["compare.seeds=2"])
