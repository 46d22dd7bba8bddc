"""Model forwards per training iteration, from the trainer's own counters, at the SD3.5
recipes' settings (configs/sd3/dppo.yaml, configs/sd3/grpo.yaml) on a tiny random SD3
pipeline: Flow-DPPO and Flow-GRPO here, and the official Flow-DPPO code's design.

The counts per sample do not depend on the network's size, so a tiny pipeline gives the
real recipe's numbers; only the prompts per iteration are lowered (2 instead of 8, the
group size stays 16). The official code's design is counted as this trainer's rollout
and update plus one more forward per trained step: it recomputes the old policy's
log-probs by replaying each trained step through the network before the update, where
this trainer records them during the rollout. Evaluation forwards are left out (they run
every log.eval_every iterations and are the same for every design).

    python benchmarks/forward_cost.py                  # about 2 minutes on 2 CPU cores
    python benchmarks/forward_cost.py --out docs/results/forward_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_pipelines import build_sd3  # noqa: E402

from flowdppo.config import load_config  # noqa: E402
from flowdppo.trainer.loop import Trainer, metrics_of  # noqa: E402

ITERATIONS = 10  # one reference-KL measurement at the real-model default (every 10)


def per_iteration(recipe: str, pipe: Path, run: Path, extra: list[str]) -> dict[str, float]:
    prompts = run.parent / "prompts.txt"
    prompts.write_text("a red cat\ntwo dogs on grass\na blue house\n")
    cfg = load_config(
        ROOT / "configs" / "sd3" / f"{recipe}.yaml",
        [
            f"model.path={pipe}",
            f"data.train_prompts={prompts}",
            "model.resolution=32",
            "model.dtype=float32",
            "model.device=cpu",
            "model.max_sequence_length=16",
            "reward.names=[jpeg_compressibility]",
            "train.prompts_per_iteration=2",
            f"train.iterations={ITERATIONS}",
            "train.threads=1",
            "log.eval_every=0",
            "log.eval_samples_per_prompt=1",
            "log.tensorboard=false",
            "log.checkpoint_every=100",
            *extra,
        ],
    )
    Trainer(cfg, run).train()
    last = metrics_of(run)[-1]
    phases = ("rollout", "ref_kl", "update", "update_ref")
    out = {p: last.get(f"forward_samples/{p}", 0.0) / ITERATIONS for p in phases}
    out["backward_samples"] = out["update"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe = build_sd3(tmp / "sd3")
        settings = {
            "flowdppo DPPO (defaults: ref KL 1 sample/group every 10)": ("dppo", []),
            "flowdppo GRPO (defaults)": ("grpo", []),
            "flowdppo DPPO, log.ref_kl_every=1 ref_kl_samples=16 (the old default)": (
                "dppo",
                ["log.ref_kl_every=1", "log.ref_kl_samples=16"],
            ),
        }
        for i, (label, (recipe, extra)) in enumerate(settings.items()):
            rows[label] = per_iteration(recipe, pipe, tmp / f"run{i}", extra)
    dppo = rows["flowdppo DPPO (defaults: ref KL 1 sample/group every 10)"]
    rows["official Flow-DPPO design (old-policy replay)"] = {
        **dppo,
        "ref_kl": 0.0,
        "old_policy_replay": dppo["update"],
    }
    base = dppo["rollout"] + dppo["update"]
    print(
        f"forward samples per iteration (32 samples: 2 prompts x 16; rollout + update = {base:g})"
    )
    for label, r in rows.items():
        total = sum(v for k, v in r.items() if k != "backward_samples")
        r["total_forward"] = total
        r["vs_rollout_plus_update"] = total / base
        print(f"  {label}: {json.dumps(r)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
