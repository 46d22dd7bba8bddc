"""One run of a comparison, in its own process: ``python -m flowdppo.compare.worker CONFIG``.

The config is fully resolved (its ``log.run_dir`` says where the run goes). A failure
prints its traceback to stderr and exits 1; the comparison reads it from the run's log.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from flowdppo.config import config_from_dict, read_yaml


def train_run(config_path: str, probe: str | None) -> dict:
    from flowdppo.trainer.loop import Trainer

    cfg = config_from_dict(read_yaml(config_path), source=config_path)
    if probe == "ratio_noise":
        from flowdppo.compare.ratio_noise import RatioNoiseTrainer

        trainer: Trainer = RatioNoiseTrainer(cfg, cfg.log.run_dir)
    else:
        trainer = Trainer(cfg, cfg.log.run_dir)
    return trainer.train()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run one resolved config of a comparison")
    ap.add_argument("config")
    ap.add_argument("--probe", default=None)
    ns = ap.parse_args(argv)
    try:
        train_run(ns.config, ns.probe)
    except Exception as exc:  # noqa: BLE001 - reported to the comparison, which goes on
        traceback.print_exc()
        print(f"RUN FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
