"""The SD3.5 recipes against their sources: the tables of docs/method.md ("Recipes") name
every setting, our value and the official one; each recipe file must hold those values,
and one shrunk iteration of each does what the released trainer does, by the counters."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from flowdppo.config import load_config, read_yaml
from flowdppo.rewards import register_reward

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "sd3"
SECTIONS = ("reward", "sampler", "objective", "train", "nft")
#: Keys a recipe sets that are not method settings (the shared text of "Recipes" says why).
NOT_SETTINGS = {"train.iterations"}


def recipe_tables() -> list[dict]:
    """Every row of the tables under "## Recipes" in docs/method.md."""
    text = (ROOT / "docs" / "method.md").read_text()
    section = text[text.index("## Recipes: every setting against its source") :]
    rows = []
    for line in section.splitlines():
        # A cell may hold an escaped pipe (\|dt\|).
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if not line.startswith("| ") or len(cells) != 6 or cells[0] in ("setting", "---"):
            continue
        setting, recipes, ours, official, source, why = cells
        key = setting[1:-1] if setting.startswith("`") and setting.endswith("`") else None
        rows.append(
            {
                "setting": setting,
                "key": key,
                "recipes": [r.strip() for r in recipes.split(",")],
                "ours": ours,
                "official": official,
                "source": source,
                "why": why,
            }
        )
    return rows


def _flat_for_cats(images, prompts):
    # Brightness, but a constant for "a cat": a group of that prompt has advantage 0.
    bright = images.float().mean(dim=tuple(range(1, images.dim())))
    return torch.where(torch.tensor(["cat" in p for p in prompts]), 0.5, bright)


register_reward("recipe_flat_for_cats")(lambda: _flat_for_cats)

ROWS = recipe_tables()
NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))


def _value(text: str):
    value = yaml.safe_load(text)
    return list(value) if isinstance(value, tuple) else value


def _same(a, b) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _get(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def test_the_tables_name_every_recipe_and_each_difference_says_why():
    named = {r for row in ROWS for r in row["recipes"]}
    assert named == set(NAMES), named ^ set(NAMES)
    for row in ROWS:
        assert row["source"], row["setting"]
        if not row["why"]:
            assert _same(_value(row["ours"]), _value(row["official"])), row


@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_holds_the_values_its_table_names(name):
    cfg = load_config(RECIPES / f"{name}.yaml")
    rows = [r for r in ROWS if name in r["recipes"] and r["key"]]
    for row in rows:
        got = _get(cfg, row["key"])
        got = list(got) if isinstance(got, tuple) else got
        assert _same(got, _value(row["ours"])), (row["key"], got, row["ours"])
    # Every setting the file writes has its row: the table is the whole recipe.
    raw = read_yaml(RECIPES / f"{name}.yaml")
    written = {"algorithm"} | {
        f"{section}.{key}" for section in SECTIONS for key in raw.get(section) or {}
    }
    assert written - NOT_SETTINGS <= {r["key"] for r in rows}, written - {r["key"] for r in rows}


def test_the_released_guard_and_nft_wiring_is_in_the_recipes():
    guard, nft = (load_config(RECIPES / f"{n}.yaml") for n in ("guard", "nft"))
    assert guard.sampler.num_sde_steps == guard.sampler.num_steps == 10
    assert guard.train.trained_steps == (0, 9) and guard.train.drop_zero_advantage
    assert nft.nft.rollout_model == "old"
    # One optimizer step per iteration over the whole batch.
    assert nft.train.minibatch_size * nft.train.grad_accum == nft.samples_per_iteration


# ------------------------------------------------------------------ one iteration each


def steps_per_iteration(cfg) -> int:
    t = cfg.train
    return t.inner_epochs * math.ceil(
        math.ceil(cfg.samples_per_iteration / t.minibatch_size) / t.grad_accum
    )


# One recipe of each wiring (the others differ from these in values only, which the tests
# above check): one drawn SDE step, every step stochastic with dropped samples, DiffusionNFT
# sampling with its old model. Each run takes about 8 s of the suite's budget.
WIRINGS = ("grpo", "guard", "nft")


@pytest.mark.parametrize("name", WIRINGS)
def test_one_iteration_of_each_recipe_does_what_the_released_trainer_does(
    name, tiny_pipes, tmp_path, monkeypatch
):
    """Each recipe shrunk to the tiny SD3 pipeline (4 steps, 2 prompts x 4 samples, 4
    minibatches of 2), keeping its structure: the stochastic and trained steps, the
    sampling model, the optimizer steps per iteration, the dropped samples."""
    from flowdppo.trainer.loop import Trainer, metrics_of

    recipe = load_config(RECIPES / f"{name}.yaml")
    s, t = recipe.sampler, recipe.train
    steps = steps_per_iteration(recipe)
    n = 4
    every_step = s.num_sde_steps == s.num_steps
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "hi"\na cat\n')  # one group of each (seed 0)
    shrink = {
        "model.path": str(tiny_pipes["sd3"]),
        "model.resolution": 32,
        "model.dtype": "float32",
        "model.device": "cpu",
        "model.max_sequence_length": 8,
        "model.lora_rank": 2,
        "data.train_prompts": str(prompts),
        "data.eval_prompts": 1,
        "reward.names": "[recipe_flat_for_cats]",
        "train.iterations": 1,
        "train.prompts_per_iteration": 2,
        "train.group_size": 4,
        "train.minibatch_size": 2,
        "train.grad_accum": 4 // steps,
        "train.micro_batch": "null",
        "sampler.num_steps": n,
        "sampler.num_sde_steps": n if every_step else 1,
        "log.eval_every": 0,
        "log.eval_samples_per_prompt": 1,
        "log.tensorboard": "false",
    }
    if t.trained_steps is not None:  # the released trainers' range: all but the last step
        assert t.trained_steps == (0, s.num_steps - 1)
        shrink["train.trained_steps"] = f"[0,{n - 1}]"
    if recipe.objective_name == "nft":
        shrink["nft.decay_start"] = 0
    cfg = load_config(RECIPES / f"{name}.yaml", [f"{k}={v}" for k, v in shrink.items()])
    monkeypatch.setattr("torch.set_num_threads", lambda k: None)
    Trainer(cfg, tmp_path / "run").train()
    (row,) = metrics_of(tmp_path / "run")
    assert row["update/optimizer_steps"] == steps  # as many as the released trainer takes
    if recipe.objective_name == "nft":
        assert row["rollout/old_model"] == int(recipe.nft.rollout_model == "old")
        assert row["rollout/sde_steps"] == 0  # a deterministic sampler
        assert row["update/trained_steps"] == max(1, int(n * recipe.nft.timestep_fraction))
    elif every_step:
        assert row["rollout/sde_step_mask"] == 2**n - 1  # every step stochastic
        assert row["update/trained_step_mask"] == 2 ** (n - 1) - 1  # all but the last trained
    else:
        assert row["rollout/sde_steps"] == row["update/trained_steps"] == 1
    if t.drop_zero_advantage:  # seed 0 draws both prompts: the cat group is dropped
        assert row["update/dropped_samples"] == 4
    kept = 8 - row["update/dropped_samples"]
    assert row["update/dropped_samples"] == (
        round(8 * row["advantage/zero_fraction"]) if t.drop_zero_advantage else 0
    )
    per_sample = row["update/trained_steps"]
    assert row["forward_samples/update"] == kept * per_sample
