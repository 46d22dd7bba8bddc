"""Trust regions in two forms: per element of the log-prob reduction and nats per step."""

import json
import math

import pytest
import yaml

from flowdppo.cli import main
from flowdppo.config import ConfigError, load_config, resolve_trust_region
from flowdppo.trainer.loop import Trainer, metrics_of

TOY_D = 2 * 2 * 2  # latent elements of the toy task's samples


def _run(tmp_path, overrides, name):
    cfg = load_config(None, overrides)
    Trainer(cfg, tmp_path / name).train()
    return metrics_of(tmp_path / name), yaml.safe_load(
        (tmp_path / name / "config.yaml").read_text()
    )


def _same_run(rows_a, rows_b):
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b):
        keys = [k for k in a if not k.startswith("time/")]
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.parametrize(
    "algorithm,key,value,engaged",
    [
        ("dppo", "dppo_threshold", 2e-4, "masked_fraction"),
        ("grpo", "clip_range", 0.02, "grad_blocked_fraction"),
    ],
)
def test_per_step_and_per_element_forms_give_identical_runs(
    tmp_path, toy_overrides, one_thread, algorithm, key, value, engaged
):
    base = toy_overrides + [f"algorithm={algorithm}", "train.inner_epochs=2"]
    rows_e, cfg_e = _run(tmp_path, base + [f"objective.{key}={value}"], "element")
    rows_s, cfg_s = _run(tmp_path, base + [f"objective.{key}_per_step={value * TOY_D}"], "step")
    _same_run(rows_e, rows_s)
    assert max(r[engaged] for r in rows_e) > 0  # the trust region acted on these runs
    for cfg in (cfg_e, cfg_s):  # config.yaml records both forms and the latent size
        obj = cfg["objective"]
        assert obj["latent_elements"] == TOY_D
        assert obj[key] == pytest.approx(value) and obj[f"{key}_per_step"] == pytest.approx(
            value * TOY_D
        )


def test_setting_both_forms_is_refused_with_both_keys_named(tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(
            None, ["objective.dppo_threshold=1e-4", "objective.dppo_threshold_per_step=6e-3"]
        )
    assert "objective.dppo_threshold " in str(err.value) + " "
    assert "objective.dppo_threshold_per_step" in str(err.value)
    run_dir = tmp_path / "never"
    code = main(
        [
            "train",
            "objective.clip_range=0.1",
            "objective.clip_range_per_step=6.4",
            f"log.run_dir={run_dir}",
        ]
    )
    err_text = capsys.readouterr().err
    assert code != 0 and err_text.startswith("error:")
    assert "objective.clip_range " in err_text and "objective.clip_range_per_step" in err_text
    assert not run_dir.exists()  # refused before any work


def test_a_runs_own_config_with_both_forms_loads_and_must_agree():
    recorded = [
        "objective.dppo_threshold=1e-4",
        "objective.dppo_threshold_per_step=6.4e-3",
        "objective.latent_elements=64",
    ]
    cfg = load_config(None, recorded)
    assert resolve_trust_region(cfg, 64).objective.dppo_threshold == 1e-4
    with pytest.raises(ConfigError, match="latent elements"):
        resolve_trust_region(cfg, 768)  # resumed on a model of another size
    with pytest.raises(ConfigError, match="disagree"):
        load_config(None, recorded[:1] + ["objective.dppo_threshold_per_step=1e-2"] + recorded[2:])


def test_defaults_are_the_papers_settings_at_its_dimension_and_carry_in_nats_per_step():
    cfg = load_config(None, [])
    sd35 = resolve_trust_region(cfg, 16 * 64 * 64).objective  # SD3.5-M latents at 512 px
    assert sd35.dppo_threshold == pytest.approx(1e-7) and sd35.clip_range == pytest.approx(1e-4)
    digits = resolve_trust_region(cfg, 64).objective
    assert digits.dppo_threshold_per_step == sd35.dppo_threshold_per_step
    assert digits.dppo_threshold == pytest.approx(1.024e-4)
    assert digits.clip_range == pytest.approx(0.1024)
    # A summed log-prob is already per step: the two forms are the same number.
    summed = load_config(None, ["sampler.log_prob_reduce=sum"])
    assert math.isclose(resolve_trust_region(summed, 64).objective.dppo_threshold, 6.5536e-3)
    # A per-element value given by the user is kept as given.
    given = load_config(None, ["objective.dppo_threshold=1e-6"])
    resolved = resolve_trust_region(given, 64).objective
    assert resolved.dppo_threshold == 1e-6 and resolved.dppo_threshold_per_step == 6.4e-5


def test_summary_records_the_resolved_trust_region(tmp_path, toy_overrides, one_thread):
    _run(tmp_path, toy_overrides + ["train.iterations=1"], "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    tr = summary["trust_region"]
    assert tr["latent_elements"] == TOY_D
    assert tr["dppo_threshold"] * TOY_D == pytest.approx(tr["dppo_threshold_per_step"])


@pytest.mark.parametrize(
    "key", ["dppo_threshold", "dppo_threshold_per_step", "clip_range", "clip_range_per_step"]
)
def test_a_zero_trust_region_is_refused_with_the_key_named(key):
    with pytest.raises(ConfigError, match=f"objective.{key}"):
        load_config(None, [f"objective.{key}=0"])


def test_a_per_step_window_that_is_no_ratio_range_is_refused():
    # Summed log-probs: the default 6.55-nat window would be the ratio range 1 +- 6.55.
    with pytest.raises(ConfigError, match="objective.clip_range directly"):
        load_config(None, ["algorithm=grpo", "sampler.log_prob_reduce=sum"])
    given = load_config(
        None, ["algorithm=grpo", "sampler.log_prob_reduce=sum", "objective.clip_range=0.2"]
    )
    assert resolve_trust_region(given, 64).objective.clip_range_per_step == 0.2
    # Flow-DPPO does not use the clip range, so the same config is fine for it.
    resolve_trust_region(load_config(None, ["sampler.log_prob_reduce=sum"]), 64)
