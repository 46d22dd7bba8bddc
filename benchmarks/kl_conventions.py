"""How far the official Flow-DPPO code's KL convention is from the exact KL.

Two measurements (docs/method.md, "Conventions"):

1. the factor between the official and the exact KL at the sigma = 1 step (the official
   code's noise std uses sigma clamped at 0.99) on SD3's shifted schedules, from the
   kernels themselves;
2. one digits run of Flow-DPPO per convention (``objective.kl_convention``), same seed:
   the logged per-step KL and the fraction of terms the mask blocks. On digits the first
   step is the one that differs by the std, and the bf16 rounding of the old means adds
   its share near the threshold.

    python benchmarks/kl_conventions.py                      # 30 iterations, 4 inner epochs
    python benchmarks/kl_conventions.py train.iterations=10
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from flowdppo import kernels, schedule
from flowdppo.config import load_config
from flowdppo.trainer.loop import Trainer, metrics_of


def sigma_one_factors(steps=(10, 25, 50), shift: float = 3.0, eta: float = 0.7) -> dict:
    out = {}
    for n in steps:
        sigmas = schedule.sigma_schedule(n, shift)
        like = torch.zeros(1, 1)
        _, std = kernels.transition(
            "flow", like, like, sigmas[0], sigmas[1], eta, sigma_max=float(sigmas[1])
        )
        official = kernels.official_flow_std(sigmas[0], sigmas[1], eta, like)
        out[n] = float(std.reshape(()) ** 2 / official.reshape(()) ** 2)
    return out


def paired_runs(overrides: list[str]) -> dict:
    base = ["train.inner_epochs=4", "train.iterations=30", "log.eval_every=0"]
    base += ["log.tensorboard=false", "log.ref_kl=false", *overrides]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for convention in ("exact", "official"):
            cfg = load_config(None, [*base, f"objective.kl_convention={convention}"])
            Trainer(cfg, Path(tmp) / convention).train()
            rows = metrics_of(Path(tmp) / convention)
            out[convention] = {
                key: statistics.fmean(r[key] for r in rows)
                for key in ("kl_mean", "masked_fraction", "kl_mask_fraction")
            }
            out[convention]["final_reward"] = rows[-1]["eval/train/reward/mean"]
    return out


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    result = {
        "sigma_one_kl_factor_official_over_exact": sigma_one_factors(),
        "digits_dppo_I4": paired_runs(argv),
        "overrides": argv,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
