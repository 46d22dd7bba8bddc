"""The compare machinery on the toy task: tables, plots, seeds, failures, bad input."""

import csv
import re
from pathlib import Path

import pytest
import torch
import yaml

from flowdppo.cli import main as cli_main
from flowdppo.compare import compare, load_experiment
from flowdppo.config import ConfigError, parse_overrides, read_yaml
from flowdppo.trainer.loop import metrics_of

PLOTS = [
    "reward_vs_iteration.png",
    "reward_vs_kl.png",
    "heldout_vs_iteration.png",
    "grad_blocked_fraction.png",
    "ratio_stats.png",
    "time_per_phase.png",
    "reward_vs_compute.png",
]


def _experiment(tmp_path: Path, toy_overrides: list[str], section: dict) -> Path:
    tree = parse_overrides(toy_overrides)
    tree["name"] = "toy-compare"
    tree["compare"] = section
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _runs_csv(out: Path) -> list[dict]:
    with open(out / "runs.csv") as f:
        return list(csv.DictReader(f))


def test_compare_writes_tables_and_plots_and_honours_seeds(tmp_path, toy_overrides):
    path = _experiment(tmp_path, toy_overrides, {"algorithms": ["dppo", "grpo"]})
    out = tmp_path / "out"
    said: list[str] = []
    code, paths = compare(path, seeds="3,5", out=out, jobs=2, echo=said.append)
    assert code == 0
    for name in ["results.md", "results.csv", "runs.csv", "compute.csv", *PLOTS]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "reward_vs_iteration.png").read_bytes()[:4] == b"\x89PNG"
    rows = _runs_csv(out)
    assert sorted((r["group"], int(r["seed"])) for r in rows) == [
        ("dppo", 3),
        ("dppo", 5),
        ("grpo", 3),
        ("grpo", 5),
    ]
    assert all(r["status"] == "ok" for r in rows)
    # Each run trained with its own seed, which its resolved config records.
    for r in rows:
        cfg = read_yaml(Path(r["run_dir"]) / "config.yaml")
        assert cfg["train"]["seed"] == int(r["seed"]) and cfg["algorithm"] == r["algorithm"]
    dppo3, dppo5 = (metrics_of(out / "runs" / f"dppo-seed{s}") for s in (3, 5))
    assert dppo3[0]["reward/mean"] != dppo5[0]["reward/mean"]
    md = (out / "results.md").read_text()
    assert "| dppo | 2/2 |" in md and "| grpo | 2/2 |" in md and "FAILED" not in md
    # Compute: training forwards of the run's counters plus its backwards counted twice.
    for r in rows:
        n = {
            k.removeprefix("count/forward_samples/"): float(v)
            for k, v in r.items()
            if v and k.startswith("count/forward_samples/")
        }
        fe = n["rollout"] + 3 * n["update"] + n.get("update_old", 0) + n.get("update_ref", 0)
        assert float(r["forward_equivalents"]) == pytest.approx(fe, rel=1e-5)
    assert "## Reward against compute" in md and "**Best at equal compute at" in md
    # The table's mean is the mean of the per-run values.
    with open(out / "results.csv") as f:
        groups = {g["group"]: g for g in csv.DictReader(f)}
    gains = [float(r["gain"]) for r in rows if r["group"] == "dppo"]
    assert float(groups["dppo"]["gain"]) == pytest.approx(sum(gains) / 2, rel=1e-4)
    # The console ends with the summary table: the groups, their seeds and gains.
    table = next(s for s in said if "seeds ok" in s).strip().splitlines()
    assert table[0].split()[:3] == ["group", "seeds", "ok"] and "held-out change" in table[0]
    dppo = next(line for line in table if line.startswith("dppo "))
    assert "2/2" in dppo and f"{float(groups['dppo']['gain']):+.3f}" in dppo
    assert any(s.strip().endswith("e-3/step.") and "Best at equal compute" in s for s in said)
    # flowdppo report of the folder: one row per group with its seeds, the winner named.
    assert cli_main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    winner = max(groups, key=lambda g: float(groups[g]["train_after"]))
    assert f"<b>Winner: {winner}</b>" in page
    assert "Best at equal compute at" in page and 'alt="reward against compute"' in page
    for g in ("dppo", "grpo"):
        assert re.search(rf"<td>(★ )?{g}</td><td>{g}</td><td>2/2</td>", page)


def test_same_seed_reproduces_in_process_and_forked(tmp_path, toy_overrides):
    path = _experiment(tmp_path, toy_overrides, {"algorithms": ["grpo"], "seeds": [1]})
    compare(path, out=tmp_path / "a", jobs=0, echo=lambda s: None)
    compare(path, out=tmp_path / "b", jobs=1, echo=lambda s: None)
    a, b = (metrics_of(tmp_path / d / "runs" / "grpo-seed1") for d in "ab")
    assert [r["reward/mean"] for r in a] == [r["reward/mean"] for r in b]


@pytest.mark.parametrize("jobs", [0, 2])
def test_a_failed_run_is_reported_and_the_exit_code_is_nonzero(tmp_path, toy_overrides, jobs):
    section = {
        "algorithms": ["dppo"],
        "seeds": 1,
        "variants": [
            {"label": "fine", "overrides": {}},
            {"label": "broken", "overrides": {"reward.names": ["toy_nan"]}},
        ],
    }
    path = _experiment(tmp_path, toy_overrides, section)
    out = tmp_path / "out"
    code = cli_main(["compare", str(path), "--out", str(out), "--jobs", str(jobs)])
    assert code == 1
    rows = {r["group"]: r for r in _runs_csv(out)}
    assert rows["dppo [fine]"]["status"] == "ok"
    assert rows["dppo [broken]"]["status"] == "failed"
    assert "NaN or infinite reward" in rows["dppo [broken]"]["error"]
    md = (out / "results.md").read_text()
    assert "| dppo [broken] | 0/1 **FAILED** |" in md
    assert "## Failed runs (1 of 2)" in md and "NaN or infinite reward" in md
    assert (out / "reward_vs_iteration.png").is_file()  # the finished run is still plotted


def test_reuse_keeps_finished_runs(tmp_path, toy_overrides):
    path = _experiment(tmp_path, toy_overrides, {"algorithms": ["dppo"], "seeds": 1})
    out = tmp_path / "out"
    compare(path, out=out, jobs=0, echo=lambda s: None)
    before = (out / "runs" / "dppo-seed0" / "metrics.jsonl").read_text()
    lines = []
    # Reusing every run re-renders the report: here at another compute budget.
    budget = ["compare.compute_budget=1000", "compare.kl_bound=none"]
    code, _ = compare(path, out=out, jobs=0, reuse=True, overrides=budget, echo=lines.append)
    assert code == 0 and any("reused" in line for line in lines)
    assert (
        "at 0.001 x 1e6 training forward-equivalents (compare.compute_budget) with no KL"
        in (out / "results.md").read_text()
    )
    assert (out / "runs" / "dppo-seed0" / "metrics.jsonl").read_text() == before


def test_ratio_noise_probe_matches_the_gaussian_theory(tmp_path, toy_overrides):
    section = {"algorithms": ["grpo"], "seeds": 1, "probe": "ratio_noise"}
    path = _experiment(tmp_path, [*toy_overrides, "train.iterations=8"], section)
    out = tmp_path / "out"
    code, paths = compare(path, out=out, jobs=0, echo=lambda s: None)
    assert code == 0 and (out / "ratio_noise.png").is_file()
    from flowdppo.compare.ratio_noise import read_probe

    records = read_probe(out / "runs" / "grpo-seed0")
    assert [r["iteration"] for r in records] == list(range(1, 9))
    d = torch.tensor([v for r in records for v in r["kl"]], dtype=torch.float64)
    lr = torch.tensor([v for r in records for v in r["log_ratio_fresh"]], dtype=torch.float64)
    assert len(d) == 8 * 2 * 8 and (d > 0).all()
    # Fresh draws from the rollout policy: z = (log r + D) / sqrt(2D) is standard normal.
    z = (lr + d) / (2 * d).sqrt()
    n = len(z)
    assert abs(float(z.mean())) < 4 / n**0.5
    assert abs(float(z.var()) - 1) < 4 * (2 / (n - 1)) ** 0.5
    assert "| grpo | 128 |" in (out / "results.md").read_text()


def test_bad_input_fails_before_any_run(tmp_path, toy_overrides):
    good = _experiment(tmp_path, toy_overrides, {"algorithms": ["dppo"], "seeds": 1})
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="unknown algorithm 'ppo'"):
        compare(good, algorithms="dppo,ppo", out=out)
    with pytest.raises(ConfigError, match="use --seeds"):
        compare(good, overrides=["train.seed=4"], out=out)
    with pytest.raises(ConfigError, match="seeds must be"):
        compare(good, seeds="1,x", out=out)
    with pytest.raises(ConfigError, match="no compare.quick section"):
        compare(good, quick=True, out=out)
    with pytest.raises(ConfigError, match="unknown key 'train.iteratons'"):
        compare(good, overrides=["train.iteratons=3"], out=out)
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        compare(good, overrides=["reward.names=[nope]"], out=out)
    assert not out.exists()  # nothing was started
    sweep = _experiment(
        tmp_path,
        toy_overrides,
        {"variants": [{"label": "a", "overrides": {"train.lr": 0.1}}], "algorithms": ["dppo"]},
    )
    with pytest.raises(ConfigError, match="what variant 'a'"):
        compare(sweep, overrides=["train.lr=0.2"], out=out)
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        compare(good, out=out)


@pytest.mark.parametrize("path", sorted(Path("configs/experiments").glob("*.yaml")), ids=str)
def test_experiment_configs_resolve_in_both_modes(path):
    # Experiments whose quick mode could not show a difference have none (e.g. shapes).
    has_quick = "quick" in (yaml.safe_load(path.read_text()).get("compare") or {})
    for quick in (False, True) if has_quick else (False,):
        exp = load_experiment(path, quick=quick)
        runs = exp.plan("unused")
        assert len(exp.seeds) >= 3 and runs
        # Budgets are pinned in the file, not taken from the defaults.
        assert "iterations" in exp.base["train"]
        assert len({r.run_dir for r in runs}) == len(runs)


def test_seed_arguments():
    from flowdppo.compare.experiment import parse_seeds

    assert parse_seeds("3") == [0, 1, 2] and parse_seeds(2) == [0, 1]
    assert parse_seeds("0,5,7") == [0, 5, 7] and parse_seeds("4,") == [4]
    with pytest.raises(ConfigError, match="--seeds 0,"):
        parse_seeds("0")
    with pytest.raises(ConfigError, match="distinct"):
        parse_seeds("1,1")


def test_per_algorithm_wiring_applies_to_that_method_under_every_variant(tmp_path, toy_overrides):
    path = _experiment(
        tmp_path,
        toy_overrides,
        {
            "algorithms": ["dppo", "nft"],
            "seeds": 1,
            "variants": [
                {"label": "I=1", "overrides": {"train.inner_epochs": 1}},
                {"label": "I=2", "overrides": {"train.inner_epochs": 2, "sampler.solver": "euler"}},
            ],
            "per_algorithm": {"nft": {"nft.rollout_model": "old", "sampler.solver": "dpm2"}},
        },
    )
    runs = {(r.algorithm, r.variant): r.config for r in load_experiment(path).plan(tmp_path)}
    assert runs["nft", "I=1"].nft.rollout_model == "old"
    assert runs["nft", "I=1"].sampler.solver == "dpm2"
    assert runs["nft", "I=2"].sampler.solver == "euler"  # the variant's knob wins
    assert runs["dppo", "I=1"].sampler.solver == "euler"  # other methods keep the shared ones
    bad = _experiment(tmp_path, toy_overrides, {"per_algorithm": {"ppo": {"train.lr": 0.1}}})
    with pytest.raises(ConfigError, match="unknown algorithm 'ppo'"):
        load_experiment(bad)
    bad = _experiment(tmp_path, toy_overrides, {"per_algorithm": {"nft": {"train.seed": 1}}})
    with pytest.raises(ConfigError, match="use --seeds"):
        load_experiment(bad)


def test_results_md_gap_table_is_what_the_stored_runs_give():
    # RESULTS.md section 10 and docs/results/gap_vs_latent.json come from the runs.csv files
    # of the committed comparisons: reading them again pairs the same seeds, same numbers.
    import json
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    import gap_vs_latent

    table = gap_vs_latent.rows(root / "docs" / "results")
    stored = json.loads((root / "docs" / "results" / "gap_vs_latent.json").read_text())
    assert table == stored
    assert {(r["task"], r["inner_epochs"]) for r in table} >= {("motion", 4), ("shapes", 1)}
    assert all(r["seeds"] == [0, 1, 2] for r in table)
    results = (root / "docs" / "RESULTS.md").read_text()
    for line in gap_vs_latent.markdown(table).splitlines()[2:]:
        task, inner, gain = (c.strip() for c in line.split("|")[1:4])
        # the page writes minus signs as U+2212
        row = re.search(rf"^\| {re.escape(task)} \| {inner} \| (\S+) ±", results, flags=re.M)
        assert row and row.group(1).replace("−", "-") == gain.split(" ±")[0], (task, inner)
