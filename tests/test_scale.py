"""Running at scale: forward batches, text-encoder offload, subsampled reference KL, host
syncs, torch.compile and update micro-batches (docs/cost.md). Every test here compares a
feature against the plain computation on tiny models; none of them times anything."""

from __future__ import annotations

import pytest
import torch

from flowdppo.config import load_config
from flowdppo.trainer.loop import Trainer, metrics_of
from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, rollout

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16
RES = 32
PROMPTS = ["a red cat", "two dogs on grass"]


def _tiny(kind: str, path, **kw):
    from flowdppo.models.diffusers_adapters import build_diffusers_model

    return build_diffusers_model(
        kind,
        path,
        resolution=RES,
        frames=5 if kind == "wan" else None,
        dtype="float32",
        device="cpu",
        max_sequence_length=SEQ,
        **kw,
    )


def _spec(model, steps: int = 4, guidance: float = 1.0) -> SamplerSpec:
    return SamplerSpec("flow", model.sigmas(steps), 0.7, guidance)


def _run(tmp_path, overrides, name):
    cfg = load_config(None, overrides)
    Trainer(cfg, tmp_path / name).train()
    return metrics_of(tmp_path / name)


def _same_numbers(a: list[dict], b: list[dict], rel: float = 0.0, skip=("time/",)) -> None:
    """Equal logs up to a relative ``rel`` (0: exactly), timings aside."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(skip)}
        assert keys == {k for k in rb if not k.startswith(skip)}
        for k in keys:
            if ra[k] != ra[k]:  # NaN
                assert rb[k] != rb[k], k
            else:
                assert abs(ra[k] - rb[k]) <= rel * abs(ra[k]), (k, ra[k], rb[k])


# ---------------------------------------------------------------- forward batch size
# guidance: the network sees 16 rows in one forward and 8 per chunk, and the CPU's GEMM
# picks its kernel by the row count for one of SD3's small matrices (the timestep
# embedding, 256 -> 16), which rounds differently by up to 2e-7 there; every other matrix
# and the noise stream are the same, so the runs agree to float rounding, not bit for bit.
@pytest.mark.parametrize("guidance,atol", [(1.0, 0.0), (4.5, 1e-5)], ids=["no-guidance", "cfg"])
def test_forward_batches_give_the_one_forward_rollout(tiny_pipes, guidance, atol):
    model = _tiny("sd3", tiny_pipes["sd3"])
    spec = _spec(model, guidance=guidance)
    prompts = [p for p in PROMPTS for _ in range(4)]
    group = torch.arange(2).repeat_interleave(4)
    runs = []
    for n in (None, 4):
        model.forward_batch_size = n
        counter = ForwardCounter()
        gen = torch.Generator().manual_seed(3)
        runs.append(rollout(model, prompts, group, spec, [0, 2], gen, counter))
        # The split is inside one logical forward: the counters do not change.
        assert counter.calls == {"rollout": 4} and counter.samples == {"rollout": 32}
    whole, split = runs
    for key in ("final", "states", "next_states", "means", "log_probs", "stds"):
        a, b = getattr(whole, key), getattr(split, key)
        assert torch.equal(a, b) if atol == 0 else torch.allclose(a, b, rtol=0, atol=atol), key


def test_forward_batch_size_splits_the_network_calls(tiny_pipes):
    model = _tiny("sd3", tiny_pipes["sd3"])
    seen: list[int] = []
    hook = model.module.register_forward_hook(
        lambda m, a, kw, out: seen.append(len(kw["hidden_states"])), with_kwargs=True
    )
    model.forward_batch_size = 3
    cond = model.encode(PROMPTS * 4)
    x = model.initial_noise(8, torch.Generator().manual_seed(0))
    v = model.batched_velocity(x, torch.tensor(0.5), cond, 4.5)
    hook.remove()
    assert v.shape == x.shape
    assert seen == [6, 6, 4]  # 3 + 3 + 2 samples, doubled by guidance


def test_forward_batch_size_training_run_is_the_same_run(tmp_path, toy_overrides):
    # Two iterations with evaluations: the noise, the prompts, the trained steps and the
    # rewards are those of the one-forward run. The toy network's 17 -> 32 matrix rounds
    # differently at 4 rows than at 8 (the CPU GEMM's kernel choice), so its floats agree
    # to rounding; a different random stream would move them by far more.
    plain = _run(tmp_path, toy_overrides, "plain")
    split = _run(tmp_path, toy_overrides + ["model.forward_batch_size=4"], "split")
    _same_numbers(plain, split, rel=1e-5)


def test_forward_batch_size_is_the_default_reward_batch(toy_overrides):
    from flowdppo.rewards import register_reward
    from flowdppo.trainer.loop import reward_options

    register_reward("toy_batched")(lambda batch_size=32: lambda images, prompts: images.mean())
    cfg = load_config(None, toy_overrides + ["reward.names=[toy_batched, toy_brightness]"])
    assert reward_options(cfg, "toy_batched") == {}
    cfg = load_config(None, cfg_overrides := toy_overrides + ["model.forward_batch_size=4"])
    cfg = load_config(None, cfg_overrides + ["reward.names=[toy_batched, toy_brightness]"])
    assert reward_options(cfg, "toy_batched") == {"batch_size": 4}
    assert reward_options(cfg, "toy_brightness") == {}  # takes no batch_size
    cfg = load_config(
        None,
        cfg_overrides + ["reward.names=[toy_batched]", "reward.options.toy_batched.batch_size=2"],
    )
    assert reward_options(cfg, "toy_batched") == {"batch_size": 2}  # the user's own wins
