"""Several rewards in one run: weight schedules, per-reward timing, weighted and gdpo."""

from __future__ import annotations

import pytest

from flowdppo.config import ConfigError, load_config, reward_weights
from flowdppo.trainer.loop import Trainer, metrics_of

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_warm_up_ramps_linearly_then_holds():
    cfg = load_config(
        None,
        [
            "task=toy",
            "reward.weights.a=0.25",
            "reward.weights.b={value: 2.0, warmup_iterations: 4}",
            "reward.weights.c={value: 1.0, warmup_iterations: 2, start: 3.0}",
        ],
    )
    got = [reward_weights(cfg.reward, i) for i in range(6)]
    assert [w["a"] for w in got] == [0.25] * 6
    assert [w["b"] for w in got] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert [w["c"] for w in got] == [3.0, 2.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "value,message",
    [
        ("{value: 1, warmup: 5}", "'b': {'value': 1, 'warmup': 5} is not a number or a warm-up"),
        ("{warmup_iterations: 5}", "'b': {'warmup_iterations': 5} is not a number or a warm-up"),
        ("{value: 1, warmup_iterations: 0}", "'b': warmup_iterations input should be greater"),
        ("heavy", "'b': 'heavy' is not a number or a warm-up"),
        (".inf", "'b': inf is not a number or a warm-up"),
    ],
)
def test_bad_weights_name_the_reward_and_the_form(value, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["task=toy", f"reward.weights.b={value}"])
    assert "reward.weights: " + message in str(err.value)
    assert len(str(err.value).splitlines()) == 2  # the heading and one line


@pytest.mark.parametrize("combine", ["weighted", "gdpo"])
def test_two_rewards_with_a_warm_up_train_and_log_each(tmp_path, toy_overrides, combine):
    overrides = toy_overrides + [
        "reward.names=[toy_brightness,toy_contrast]",
        "reward.weights.toy_contrast={value: 0.5, warmup_iterations: 2}",
        f"reward.combine={combine}",
        f"log.run_dir={tmp_path / 'run'}",
    ]
    Trainer(load_config(None, overrides), tmp_path / "run").train()
    rows = metrics_of(tmp_path / "run")
    assert [r["reward/toy_contrast/weight"] for r in rows] == [0.0, 0.25]
    for row in rows:
        each = [row[f"time/reward/{name}"] for name in ("toy_brightness", "toy_contrast")]
        assert min(each) > 0.0 and row["time/reward"] >= max(each)  # inside the phase
