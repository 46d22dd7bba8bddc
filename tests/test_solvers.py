"""The ODE solvers (``sampler.solver``): Euler, and DiffusionNFT's second-order multistep
DPM-Solver++ (``dpm2``).

The order check runs the tiny random SD3 pipeline: with the same noise, dpm2's final
latents approach Euler's many-step limit at order about 2 in the number of steps, Euler's
at order 1. The default (euler) is the sampler it always was, bit for bit; with SDE steps
the solver's history restarts after each stochastic step and replay is untouched.
"""

from __future__ import annotations

import math

import pytest
import tiny_pipelines
import torch
from conftest import ToyModel

from flowdppo import kernels, schedule, solvers
from flowdppo.config import Config, ConfigError, load_config
from flowdppo.trainer.loop import make_sampler_spec
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, rollout, sample
from flowdppo.trainer.update import ObjectiveSpec, step_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _official_2m(x, x0, x0_prev, sigma_prev, sigma, sigma_next):
    """DPM-Solver++(2M) in its textbook form, alpha = 1 - sigma, float64."""
    lam = [math.log((1 - s) / s) for s in (sigma_prev, sigma, sigma_next)]
    h, h_prev = lam[2] - lam[1], lam[1] - lam[0]
    d1 = (x0 - x0_prev) * h / h_prev
    return (sigma_next / sigma) * x - (1 - sigma_next) * math.expm1(-h) * (x0 + 0.5 * d1)


def test_dpm2_step_is_the_textbook_2m_update_and_first_order_where_it_must_be():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    x0_prev = torch.randn(3, 4, 4, generator=g)
    hist = solvers.History(0.8, x0_prev)
    out, new = solvers.ode_step("dpm2", v, x, 0.6, 0.45, hist)
    want = _official_2m(x.double(), (x - 0.6 * v).double(), x0_prev.double(), 0.8, 0.6, 0.45)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert new.sigma == pytest.approx(0.6) and torch.equal(new.x0, x - torch.tensor(0.6) * v)
    euler, none = solvers.ode_step("euler", v, x, 0.6, 0.45, hist)
    assert none is None and torch.equal(euler, kernels.step("ode", v, x, 0.6, 0.45, 0.7).mean)
    # First-order (exactly Euler): no history, history made at sigma = 1 (lambda = -inf),
    # and the step to sigma = 0 (lambda = +inf).
    assert torch.equal(solvers.ode_step("dpm2", v, x, 0.6, 0.45, None)[0], euler)
    assert torch.equal(solvers.ode_step("dpm2", v, x, 0.6, 0.45, solvers.History(1.0, x))[0], euler)
    last = solvers.ode_step("dpm2", v, x, 0.6, 0.0, hist)[0]
    assert torch.equal(last, solvers.ode_step("euler", v, x, 0.6, 0.0)[0])
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        solvers.ode_step("heun", v, x, 0.6, 0.45)
    with pytest.raises(ValueError, match="one sigma for the whole batch"):
        solvers.ode_step("dpm2", v, x, torch.tensor([0.6, 0.5, 0.4]), 0.3)


def _euler_loop(model, cond, noise, sigmas, sde_steps=(), kernel="flow", gen=None):
    """The sampler as it was before solvers existed: kernels.step, "ode" off the SDE steps."""
    x = noise.float()
    for k in range(len(sigmas) - 1):
        v = model.velocity(x, sigmas[k].expand(x.shape[0]), cond)
        kind = kernel if k in sde_steps else "ode"
        x = kernels.step(
            kind, v, x, sigmas[k], sigmas[k + 1], 0.7, generator=gen, sigma_max=float(sigmas[1])
        ).prev_sample
    return x


def test_default_solver_is_euler_and_samples_bit_for_bit_as_before():
    cfg = Config(task="toy")
    assert cfg.sampler.solver == "euler"
    model = ToyModel()
    spec = make_sampler_spec(cfg, 1.0, None, model)
    assert spec.solver == "euler" and SamplerSpec("flow", spec.sigmas, 0.7).solver == "euler"
    cond = model.encode(["bright", "dark"] * 2)
    noise = model.initial_noise(4, torch.Generator().manual_seed(1))
    ours, _ = sample(model, cond, noise, spec, [], torch.Generator(), ForwardCounter())
    assert torch.equal(ours, _euler_loop(model, cond, noise, spec.sigmas))
    # With SDE steps too: the same noise draws, the same final latents.
    ours, _ = sample(
        model, cond, noise, spec, [1, 3], torch.Generator().manual_seed(2), ForwardCounter()
    )
    old = _euler_loop(model, cond, noise, spec.sigmas, {1, 3}, gen=torch.Generator().manual_seed(2))
    assert torch.equal(ours, old)
    # dpm2 with at most two steps has only first-order steps: Euler exactly.
    for n in (1, 2):
        s = schedule.sigma_schedule(n)
        e = sample(model, cond, noise, SamplerSpec("flow", s, 0.7), [], None, ForwardCounter())
        d = sample(
            model,
            cond,
            noise,
            SamplerSpec("flow", s, 0.7, solver="dpm2"),
            [],
            None,
            ForwardCounter(),
        )
        assert torch.equal(e[0], d[0])


def test_dpm2_history_restarts_after_an_sde_step_and_replay_gives_ratio_one():
    model = ToyModel()
    sigmas = schedule.sigma_schedule(6)
    spec = SamplerSpec("flow", sigmas, 0.7, solver="dpm2")
    prompts = ["bright", "dark", "bright", "dark"]
    group = torch.tensor([0, 1, 0, 1])
    ro = rollout(
        model, prompts, group, spec, [2], torch.Generator().manual_seed(0), ForwardCounter()
    )
    # Re-walk the trajectory by hand: dpm2 up to step 2, the stored SDE step, then a
    # fresh start (no history) from the stochastic step's sample.
    cond = model.encode(prompts)
    x = model.initial_noise(4, torch.Generator().manual_seed(0))
    hist = None
    for k in range(6):
        v = model.velocity(x, sigmas[k].expand(4), cond)
        if k == 2:
            assert torch.equal(x, ro.states[0])
            x, hist = ro.next_states[0], None
            continue
        x, hist = solvers.ode_step("dpm2", v, x, sigmas[k], sigmas[k + 1], hist)
    assert torch.equal(x, ro.final)
    # Keeping the history across the SDE step would have given other latents.
    assert not torch.equal(ro.final, _euler_loop(model, cond, ro.next_states[0], sigmas[2:]))
    # Replay re-scores the SDE step with its kernel: the first ratio is exactly 1.
    loss, stats = step_loss(
        model,
        ro,
        torch.arange(4),
        0,
        torch.tensor([1.0, -1, 0.5, -0.5]),
        spec,
        ObjectiveSpec("dppo", 1e-4, 1e-4),
        ForwardCounter(),
    )
    assert float(stats["ratio_max"]) == pytest.approx(1, abs=1e-6)
    assert float(stats["ratio_min"]) == pytest.approx(1, abs=1e-6)


def test_sampler_solver_is_a_config_key_and_a_bad_name_is_one_error():
    cfg = load_config(None, ["task=toy", "sampler.solver=dpm2", "algorithm=nft"])
    assert make_sampler_spec(cfg, 1.0, None).solver == "dpm2"
    with pytest.raises(ConfigError, match="sampler.solver"):
        load_config(None, ["task=toy", "sampler.solver=dpm3"])


def _order(steps, errors) -> float:
    xs = torch.log(torch.tensor(steps, dtype=torch.float64))
    ys = torch.log(torch.tensor(errors, dtype=torch.float64))
    xs, ys = xs - xs.mean(), ys - ys.mean()
    return -float((xs * ys).sum() / (xs * xs).sum())


def test_dpm2_approaches_the_euler_limit_at_second_order_on_tiny_sd3(tiny_pipes):
    from flowdppo.models.diffusers_adapters import build_diffusers_model

    model = build_diffusers_model(
        "sd3",
        tiny_pipes["sd3"],
        resolution=16,
        dtype="float32",
        device="cpu",
        max_sequence_length=16,
    )
    tiny_pipelines.smooth_in_sigma(model.module)
    cond = model.encode(["a red cat"])
    noise = model.initial_noise(1, torch.Generator().manual_seed(0))

    def final(n: int, solver: str) -> torch.Tensor:
        # SD3's shift 3 on a schedule that runs to 0 (the pipeline's own stops at
        # sigma = 0.003 first: docs/method.md shows what that does to dpm2).
        spec = SamplerSpec("flow", schedule.sigma_schedule(n, 3.0), 0.7, solver=solver)
        return sample(model, cond, noise, spec, [], None, ForwardCounter())[0]

    with torch.no_grad():
        limit = 2 * final(256, "euler") - final(128, "euler")  # Richardson: O(1/128^2)
        steps = [4, 8, 16, 32]
        err = {
            s: [float((final(n, s) - limit).norm() / limit.norm()) for n in steps]
            for s in solvers.SOLVERS
        }
    assert all(d < e for d, e in zip(err["dpm2"], err["euler"], strict=True)), err
    assert 0.9 < _order(steps, err["euler"]) < 1.1, err
    assert 1.8 < _order(steps, err["dpm2"]) < 2.6, err
    assert err["dpm2"][-1] < err["euler"][-1] / 5, err


def test_evaluations_can_use_another_solver_than_the_rollouts(tmp_path, toy_overrides):
    """DiffusionNFT's trainer samples its rollouts with dpm2 and evaluates with Euler."""
    from flowdppo.trainer.loop import Trainer

    over = [*toy_overrides, "sampler.solver=dpm2", f"log.run_dir={tmp_path / 'run'}"]
    trainer = Trainer(load_config(None, [*over, "log.eval_solver=euler"]), tmp_path / "run")
    assert (trainer.spec.solver, trainer.evaluator.spec.solver) == ("dpm2", "euler")
    trainer._release_run_dir()
    same = Trainer(load_config(None, over), tmp_path / "same")  # null: the sampler's
    assert same.evaluator.spec.solver == "dpm2"
    same._release_run_dir()
    with pytest.raises(ConfigError, match="eval_solver"):
        load_config(None, ["log.eval_solver=rk4"])


def test_evaluations_measure_the_kl_on_their_own_sde_steps(tmp_path, toy_overrides):
    """Methods that explore on other steps (GRPO-Guard: all of them) are compared on one KL."""
    from flowdppo.trainer.loop import Trainer

    every = [*toy_overrides, "sampler.num_sde_steps=6", "sampler.sde_window=[0,1]"]
    over = [*every, "log.eval_sde_steps=2", "log.eval_sde_window=[0,0.5]"]
    trainer = Trainer(load_config(None, over), tmp_path / "run")
    assert (trainer.evaluator.num_sde_steps, trainer.evaluator.sde_window) == (2, (0.0, 0.5))
    trainer._release_run_dir()
    with pytest.raises(ConfigError, match="log.eval_sde_steps"):
        load_config(None, [*every, "log.eval_sde_steps=4", "log.eval_sde_window=[0,0.5]"])
