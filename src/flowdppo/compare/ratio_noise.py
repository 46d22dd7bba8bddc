"""The ratio-noise probe (docs/method.md): the per-step log-ratio against the exact KL.

For a transition ``x' ~ N(mu_old, std^2 I)`` and a new mean ``mu_new = mu_old + d``, the
summed log-ratio ``log pi_new(x') - log pi_old(x')`` is Gaussian with mean ``-D`` and
variance ``2 D``, where ``D = ||d||^2 / (2 std^2)`` is the exact (summed) KL. The
single-sample ratio is as noisy as the divergence it is meant to measure.

After every iteration's update, :class:`RatioNoiseTrainer` measures, at every recorded SDE
state of the rollout (with the updated weights, no gradient):

* ``D``: the exact summed KL between the updated and the rollout policy;
* ``fresh``: the log-ratio of a fresh draw ``x' ~ pi_old`` (noise from a separate
  generator, so training is unchanged): the setting of the derivation, where
  ``z = (log r + D) / sqrt(2 D)`` should be standard normal;
* ``trained``: the log-ratio of the rollout's own ``x'``, the sample the update was fitted
  to, which is what a ratio-clipping objective sees in its next inner epoch.

It appends one JSON line per iteration to ``ratio_noise.jsonl`` in the run directory. The
probe costs one extra no-gradient forward per recorded step and is timed into the update
phase, so compare its wall time with care.
"""

from __future__ import annotations

import json

import torch

from flowdppo import kernels
from flowdppo.trainer.loop import Trainer
from flowdppo.trainer.rollout import ForwardCounter

FILE = "ratio_noise.jsonl"


def _round(t: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in t.flatten().tolist()]


class RatioNoiseTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._probe_gen = torch.Generator().manual_seed(self.cfg.train.seed + 7919)
        self._probe_counter = ForwardCounter()  # kept out of the run's own counts

    def _update(self, ro, advantages, metrics) -> None:
        super()._update(ro, advantages, metrics)
        record = {"iteration": self.iteration + 1, **self._probe(ro)}
        with open(self.run_dir / FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def _probe(self, ro) -> dict[str, list[float]]:
        spec = self.spec
        kl, fresh, trained = [], [], []
        for i, k in enumerate(ro.sde_steps):
            x = ro.states[i]
            sigma = spec.sigmas[k].expand(x.shape[0])
            v = self._probe_counter.velocity(
                self.model, "probe", x, sigma, ro.cond, spec.guidance_scale
            )
            mean_new, std = spec.transition(k, v, x)
            mean_old = ro.means[i]
            noise = torch.randn(mean_old.shape, generator=self._probe_gen)
            x_fresh = mean_old + std * noise
            kl.append(kernels.gaussian_kl(mean_new, mean_old, std, "sum"))
            for target, xs in ((fresh, x_fresh), (trained, ro.next_states[i])):
                target.append(
                    kernels.gaussian_log_prob(xs, mean_new, std, "sum")
                    - kernels.gaussian_log_prob(xs, mean_old, std, "sum")
                )
        return {
            "elements": int(ro.states[0, 0].numel()),
            "kl": _round(torch.stack(kl)),
            "log_ratio_fresh": _round(torch.stack(fresh)),
            "log_ratio_trained": _round(torch.stack(trained)),
        }


def read_probe(run_dir) -> list[dict]:
    from pathlib import Path

    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
