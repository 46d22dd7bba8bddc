"""When does Flow-DPPO help? The paired gap (Flow-DPPO minus Flow-GRPO, same seed) against
the latent size d, for each inner-epoch count, read from finished comparisons.

Every folder is the output of one ``flowdppo compare`` at the paper's trust regions held in
nats per step (docs/method.md, "Units"), so the two methods differ only in their trust
region. Per (task, inner epochs) and seed, the gap of

* the final reward gain (at the transferred settings),
* the gain at matched KL (each folder's ``gain_at_matched_kl``: the gain each run had, along
  its own evaluations, at the lowest final KL of any run of that folder),
* the held-out change (forgetting),

and, per method, the mechanism: the spread of the per-sample log-ratio (``ratio_std``), the
fraction of loss terms its trust region blocked (``grad_blocked``) and the final KL.

    python benchmarks/gap_vs_latent.py            # the folders under docs/results/
    python benchmarks/gap_vs_latent.py --png docs/images/gap_vs_latent.png \\
        --json docs/results/gap_vs_latent.json

Reads only ``runs.csv`` files; trains nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (task, latent elements d, results folder, the groups' label pattern per inner-epoch count)
SOURCES = [
    ("digits", 64, "scaled_digits", r"^I=(\d) lr=1e-3$"),
    ("shapes", 768, "scaled_shapes", r"^I=(\d)$"),
    ("text", 4096, "table_text", r"^I=(1)$"),
    ("text", 4096, "scaled_text", r"^I=(\d)$"),
    ("motion", 13824, "scaled_motion", r"^I=(\d)$"),
]
METHODS = ("dppo", "grpo")
GAPS = ("gain", "gain_at_matched_kl", "heldout_change")
MECHANISM = ("ratio_std", "grad_blocked", "kl_ref")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _spread(values: list[float]) -> dict:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def read_folder(folder: Path, pattern: str) -> dict[int, dict[str, dict[int, dict]]]:
    """{inner epochs: {method: {seed: run row}}} of the finished runs in ``runs.csv``."""
    out: dict[int, dict[str, dict[int, dict]]] = {}
    with (folder / "runs.csv").open() as f:
        for row in csv.DictReader(f):
            match = re.match(pattern, row["variant"])
            if row["status"] != "ok" or row["algorithm"] not in METHODS or not match:
                continue
            by_method = out.setdefault(int(match.group(1)), {})
            by_method.setdefault(row["algorithm"], {})[int(row["seed"])] = row
    return out


def rows(results: Path) -> list[dict]:
    """One row per (task, inner epochs) with both methods' runs: the paired gaps and each
    method's mechanism numbers, mean and sd over seeds."""
    table = []
    for task, d, name, pattern in SOURCES:
        folder = results / name
        if not (folder / "runs.csv").exists():
            continue
        for inner, by_method in sorted(read_folder(folder, pattern).items()):
            if not all(m in by_method for m in METHODS):
                continue
            seeds = sorted(set(by_method["dppo"]) & set(by_method["grpo"]))
            row = {"task": task, "d": d, "inner_epochs": inner, "seeds": seeds, "folder": name}
            for key in GAPS:
                row[f"gap/{key}"] = _spread(
                    [
                        _float(by_method["dppo"][s][key]) - _float(by_method["grpo"][s][key])
                        for s in seeds
                    ]
                )
            for method in METHODS:
                for key in (*GAPS, *MECHANISM):
                    row[f"{method}/{key}"] = _spread(
                        [_float(by_method[method][s][key]) for s in seeds]
                    )
            table.append(row)
    return table


def _fmt(cell: dict, scale: float = 1.0, digits: int = 3) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean'] * scale:+.{digits}f} ± {cell['sd'] * scale:.{digits}f}"


def markdown(table: list[dict]) -> str:
    lines = [
        "| task (d) | I | gap: gain | gap: gain at matched KL | gap: held-out change "
        "| KL (1e-3) DPPO / GRPO | grad blocked DPPO / GRPO | ratio sd DPPO / GRPO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        kl = f"{r['dppo/kl_ref']['mean']:.2f} / {r['grpo/kl_ref']['mean']:.2f}"
        blocked = f"{r['dppo/grad_blocked']['mean']:.3f} / {r['grpo/grad_blocked']['mean']:.3f}"
        noise = f"{r['dppo/ratio_std']['mean']:.2e} / {r['grpo/ratio_std']['mean']:.2e}"
        lines.append(
            f"| {r['task']} ({r['d']:,}) | {r['inner_epochs']} | {_fmt(r['gap/gain'])} "
            f"| {_fmt(r['gap/gain_at_matched_kl'])} | {_fmt(r['gap/heldout_change'])} "
            f"| {kl} | {blocked} | {noise} |"
        )
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (
        ("gap/gain", "paired gain gap, transferred settings"),
        ("gap/gain_at_matched_kl", "paired gain gap at matched KL"),
        ("gap/heldout_change", "paired held-out change gap"),
    )
    for ax, (key, title) in zip(axes, panels):
        for inner, marker in ((1, "o"), (2, "s"), (4, "^")):
            pts = [r for r in table if r["inner_epochs"] == inner and r[key]["mean"] is not None]
            if not pts:
                continue
            ax.errorbar(
                [r["d"] for r in pts],
                [r[key]["mean"] for r in pts],
                yerr=[r[key]["sd"] for r in pts],
                marker=marker,
                capsize=3,
                label=f"I={inner}",
            )
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("latent elements d")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("Flow-DPPO − Flow-GRPO (same seed)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "docs" / "results"))
    p.add_argument("--png", help="write the figure here")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args()
    table = rows(Path(args.results))
    print(markdown(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1) + "\n")
    if args.png:
        plot(table, Path(args.png))


if __name__ == "__main__":
    main()
