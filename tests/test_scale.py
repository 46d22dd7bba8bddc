"""Running at scale: forward batches, text-encoder offload, subsampled reference KL, host
syncs, torch.compile and update micro-batches (docs/cost.md). Every test here compares a
feature against the plain computation on tiny models; none of them times anything."""

from __future__ import annotations

import pytest
import torch

from flowdppo.config import ConfigError, load_config
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
    """Equal logs up to a relative ``rel`` (0: exactly; else also 1e-12 absolute, for a KL of
    0 that rounds to 1e-15), timings aside."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(skip)}
        assert keys == {k for k in rb if not k.startswith(skip)}
        for k in keys:
            if ra[k] != ra[k]:  # NaN
                assert rb[k] != rb[k], k
            else:
                tol = rel * abs(ra[k]) + (1e-12 if rel else 0.0)
                if rel and k.startswith("ratio_"):
                    # Ratios of unchanged weights are 1 up to float32 rounding, and MKL picks
                    # its kernel by row count on some CPUs (AMD EPYC here): their spread is
                    # 0 or a few 1e-8.
                    tol = max(tol, 1.2e-7)
                assert abs(ra[k] - rb[k]) <= tol, (k, ra[k], rb[k])


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


# ---------------------------------------------------------------- text-encoder offload
def test_offloaded_text_encoders_give_the_same_run_and_visit_the_device_only_to_encode(
    tiny_pipes, monkeypatch
):
    from flowdppo.models.diffusers_adapters import base

    kept = _tiny("sd3", tiny_pipes["sd3"], offload_text_encoders=False)
    model = _tiny("sd3", tiny_pipes["sd3"], offload_text_encoders=True)
    # This machine has one device, the CPU: stand a marker in for the offload device to see
    # where each component is sent, and when.
    moves: list[tuple[str, str]] = []
    names = {id(c): n for n, c in model.pipe.components.items()}
    names[id(model.pipe.vae.encoder)] = "vae.encoder"
    real_to = torch.nn.Module.to

    def spy(self, *args, **kw):
        if id(self) in names:
            moves.append((names[id(self)], "offload" if args[0] is marker else "device"))
            return self
        return real_to(self, *args, **kw)

    marker = torch.device("cpu")
    monkeypatch.setattr(base, "OFFLOAD_DEVICE", marker)
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    spec = _spec(model, guidance=4.5)
    prompts = [p for p in PROMPTS for _ in range(2)]
    group = torch.arange(2).repeat_interleave(2)
    ros = []
    for m in (kept, model):
        moves.clear()
        ros.append(
            rollout(
                m, prompts, group, spec, [1], torch.Generator().manual_seed(0), ForwardCounter()
            )
        )
        ros.append(
            rollout(
                m, prompts, group, spec, [1], torch.Generator().manual_seed(1), ForwardCounter()
            )
        )
    monkeypatch.undo()
    for a, b in zip(ros[:2], ros[2:]):
        for key in ("final", "states", "next_states", "log_probs"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert all(torch.equal(a.cond[k], b.cond[k]) for k in a.cond)
    encoders = sorted(n for n in names.values() if n.startswith("text_encoder"))
    assert len(encoders) == 3
    # One visit for the prompts, one for the negative prompt; the second rollout's prompts
    # come from the cache and move nothing.
    visit = [(n, "device") for n in encoders] + [(n, "offload") for n in encoders]
    assert moves == visit + visit
    assert all(v.device.type == "cpu" for entry in model._cache.values() for v in entry.values())

    # At load: the text encoders never go to the device, the VAE's encoder goes to the
    # offload device, everything else to the device.
    loaded: list[tuple[str, str]] = []

    def spy_load(self, *args, **kw):
        where = "offload" if args and args[0] is marker else "device"
        loaded.append((type(self).__name__, where))
        return real_to(self, *args, **kw)

    monkeypatch.setattr(base, "OFFLOAD_DEVICE", marker)
    monkeypatch.setattr(torch.nn.Module, "to", spy_load)
    _tiny("sd3", tiny_pipes["sd3"], offload_text_encoders=True)
    monkeypatch.undo()
    assert set(loaded) == {
        ("SD3Transformer2DModel", "device"),
        ("AutoencoderKL", "device"),
        ("Encoder", "offload"),
    }


# ---------------------------------------------------------------- reference KL subsampling
def test_subsampled_reference_kl_is_an_unbiased_estimate_of_the_full_one():
    import copy

    from conftest import ToyModel

    from flowdppo.trainer.rollout import reference_kl, reference_kl_rows

    model = ToyModel()
    model.frozen_reference = copy.deepcopy(model.module).requires_grad_(False)
    with torch.no_grad():  # a policy some way from the reference
        for p in model.module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    spec = SamplerSpec("flow", torch.linspace(1, 0, 7), 0.7)
    prompts = ["bright", "dark", "grey", "dark"]
    batch = [p for p in prompts for _ in range(4)]
    group = torch.arange(4).repeat_interleave(4)
    ro = rollout(
        model, batch, group, spec, [1, 3], torch.Generator().manual_seed(0), ForwardCounter()
    )
    full = reference_kl(model, ro, spec, ForwardCounter())
    counter = ForwardCounter()
    rows = reference_kl_rows(group, 1, seed=5)
    sub = reference_kl(model, ro, spec, counter, rows)
    assert counter.samples == {"ref_kl": 2 * 4}  # one sample per group and step
    assert torch.equal(group[rows], torch.arange(4))
    torch.testing.assert_close(sub, full[:, rows], rtol=1e-5, atol=0)
    # Over many draws the estimate's mean is the full mean (within 4 standard errors), and
    # every sample is drawn as often as any other.
    draws = [reference_kl_rows(group, 1, seed=s) for s in range(3000)]
    estimates = torch.stack([full[:, r].mean() for r in draws]).double()
    se = estimates.std() / len(estimates) ** 0.5
    assert full.std(dim=1).max() > 0.2 * full.mean()  # the samples differ: a real test
    assert abs(estimates.mean() - full.double().mean()) < 4 * se
    hits = torch.bincount(torch.cat(draws), minlength=16).double()
    assert hits.min() > 0.85 * hits.mean() and hits.max() < 1.15 * hits.mean()


def test_reference_kl_every_and_samples_in_a_run(tmp_path, toy_overrides):
    rows = _run(
        tmp_path,
        toy_overrides + ["train.iterations=4", "log.ref_kl_every=2", "log.ref_kl_samples=1"],
        "sub",
    )
    assert ["kl_ref/mean" in r for r in rows] == [False, True, False, True]
    assert [r.get("kl_ref/samples") for r in rows] == [None, 2, None, 2]  # one per group
    # 2 measurements x 2 recorded steps x 2 samples
    assert rows[-1]["forward_samples/ref_kl"] == 8


def test_reference_kl_defaults_are_cheap_for_real_models_only(toy_overrides):
    from flowdppo.config import ref_kl_plan

    assert ref_kl_plan(load_config(None, toy_overrides)) == (1, None)
    real = ["task=prompts", "model.kind=sd3"]
    assert ref_kl_plan(load_config(None, real)) == (10, 1)
    assert ref_kl_plan(load_config(None, real + ["log.ref_kl_every=1"])) == (1, 1)
    with pytest.raises(ValueError, match="log.ref_kl_samples"):
        load_config(None, toy_overrides + ["log.ref_kl_samples=5"])


# ---------------------------------------------------------------- host syncs
class _OnDevice(torch.Tensor):
    """Marks what would live on the GPU (the recorded latents and everything computed from
    the model's output; torch keeps the subclass through every op) and counts each read of
    such a value back to the host, which on a GPU waits for all queued work."""

    reads = 0

    def _read(self, name, *args):
        _OnDevice.reads += 1
        return getattr(torch.Tensor, name)(self.as_subclass(torch.Tensor), *args)

    def __bool__(self):
        return self._read("__bool__")

    def __float__(self):
        return self._read("__float__")

    def __int__(self):
        return self._read("__int__")

    def item(self):
        return self._read("item")

    def tolist(self):
        return self._read("tolist")

    def numpy(self, *args, **kw):
        return self._read("numpy")

    def cpu(self, *args, **kw):
        return self._read("cpu")


@pytest.mark.parametrize(
    "extra,optimizer_steps",
    [([], 2), (["train.inner_epochs=2", "train.minibatch_size=2", "train.grad_accum=2"], 4)],
    ids=["plain", "accumulated"],
)
def test_the_update_reads_the_device_once_per_optimizer_step_and_once_at_the_end(
    tmp_path, toy_overrides, monkeypatch, extra, optimizer_steps
):
    over = toy_overrides + ["sampler.num_sde_steps=3", "train.minibatch_size=4"] + extra
    trainer = Trainer(load_config(None, over), tmp_path / "run")
    prompts, group = trainer._draw_prompts()
    ro = trainer._rollout(prompts, group, [0, 1, 2])
    for key in ("states", "next_states", "means", "log_probs"):
        setattr(ro, key, getattr(ro, key).as_subclass(_OnDevice))
    advantages = torch.randn(ro.batch_size).as_subclass(_OnDevice)
    velocity = trainer.model.velocity
    monkeypatch.setattr(
        trainer.model, "velocity", lambda *a, **k: velocity(*a, **k).as_subclass(_OnDevice)
    )
    _OnDevice.reads = 0
    metrics: dict = {}
    trainer._update(ro, advantages, metrics)
    # 3 trained steps x 2 (or 8) minibatches: no read per trained step, one per optimizer
    # step (the skip decision), one for all the statistics.
    assert trainer.optimizer_steps == optimizer_steps
    assert _OnDevice.reads == optimizer_steps + 1
    assert metrics["grad_norm"] > 0 and 0 <= metrics["masked_fraction"] <= 1
    assert metrics["first_update_ratio_dev"] < 1e-5
    trainer._release_run_dir()


# ---------------------------------------------------------------- torch.compile
# The aot_eager backend: dynamo's graph capture and AOTAutograd's forward/backward split,
# which is what can break LoRA, the reference switch, state-dict names or resume; the
# inductor backend adds code generation, several minutes of C++ compilation on this
# shared 2-core machine, too slow for the suite (docs/cost.md says how to check it). The
# model is the smallest there is (the toy MLP); still, importing torch._dynamo takes about
# 14 s here, so the test is marked slow.
@pytest.mark.slow
def test_compiled_run_matches_eager_and_keeps_checkpoints_and_resume(tmp_path, toy_overrides):
    from safetensors.torch import load_file

    pytest.importorskip("torch._dynamo")
    over = toy_overrides + ["log.eval_samples_per_prompt=2"]
    eager = _run(tmp_path, over, "eager")
    compiled_over = over + ["train.compile=true", "train.compile_backend=aot_eager"]
    compiled = _run(tmp_path, compiled_over, "compiled")
    _same_numbers(eager, compiled, rel=1e-5)
    a = load_file(tmp_path / "eager" / "ckpt-000002" / "model.safetensors")
    b = load_file(tmp_path / "compiled" / "ckpt-000002" / "model.safetensors")
    assert set(a) == set(b) and all("_orig_mod" not in k for k in b)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    # Resume a compiled run for one more iteration: the same as an eager resume.
    for name, extra in (("eager", []), ("compiled", compiled_over[len(over) :])):
        cfg = load_config(None, over + extra + ["train.iterations=3"])
        Trainer(cfg, tmp_path / name, resume=True).train()
    _same_numbers(metrics_of(tmp_path / "eager"), metrics_of(tmp_path / "compiled"), rel=1e-5)


# ---------------------------------------------------------------- update micro-batches
def test_micro_batches_give_the_minibatch_gradient(tmp_path, toy_overrides):
    from safetensors.torch import load_file

    over = toy_overrides + ["train.minibatch_size=4", "train.grad_accum=2"]
    whole = _run(tmp_path, over, "whole")
    micro = _run(tmp_path, over + ["train.micro_batch=3"], "micro")  # 4 = 3 + 1
    skip = ("time/", "backward_calls", "forward_calls/update", "first_update_ratio_dev")
    _same_numbers(whole, micro, rel=1e-5, skip=skip)
    # The first replay's ratio is 1 up to one float32 rounding either way (0 vs 6e-8).
    assert all(r["first_update_ratio_dev"] < 1e-6 for r in whole + micro)
    # Each trained step of a minibatch of 4 is two forwards and backwards, of 3 and 1.
    assert micro[-1]["backward_calls"] == 2 * whole[-1]["backward_calls"]
    assert micro[-1]["forward_samples/update"] == whole[-1]["forward_samples/update"]
    a = load_file(tmp_path / "whole" / "ckpt-000002" / "model.safetensors")
    b = load_file(tmp_path / "micro" / "ckpt-000002" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_fused_steps_give_the_per_step_gradient_in_one_forward_per_pass(tmp_path, toy_overrides):
    from safetensors.torch import load_file

    # Micro-batches and the reference penalty too: one forward and backward per pass over
    # all trained steps (one more forward under the reference), the same numbers.
    over = toy_overrides + ["train.minibatch_size=4", "train.micro_batch=3", "objective.beta=0.1"]
    steps = _run(tmp_path, over, "steps")
    fused = _run(tmp_path, over + ["train.fuse_steps=true"], "fused")
    calls = ("backward_calls", "forward_calls/update", "forward_calls/update_ref")
    skip = ("time/", "first_update_ratio_dev", *calls)
    _same_numbers(steps, fused, rel=1e-5, skip=skip)
    assert all(r["first_update_ratio_dev"] < 1e-6 for r in steps + fused)
    terms = int(steps[-1]["update/trained_steps"])
    assert terms > 1
    for key in calls:
        assert fused[-1][key] * terms == steps[-1][key], key
    for key in ("forward_samples/update", "forward_samples/update_ref"):
        assert fused[-1][key] == steps[-1][key] > 0
    a = load_file(tmp_path / "steps" / "ckpt-000002" / "model.safetensors")
    b = load_file(tmp_path / "fused" / "ckpt-000002" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_fused_steps_are_refused_where_there_are_no_recorded_steps():
    with pytest.raises(ConfigError, match="train.fuse_steps batches the recorded SDE steps"):
        load_config(None, ["algorithm=nft", "train.fuse_steps=true"])


# ---------------------------------------------------------------- the GPU benchmark
def test_gpu_throughput_benchmark_runs_at_toy_size(tmp_path):
    import json
    import math
    import sys
    from pathlib import Path

    pytest.importorskip("diffusers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_throughput

    out = tmp_path / "gpu.json"
    gpu_throughput.main(["--tiny", "--device", "cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["tiny"] and report["matmul_peak_tflops"] > 0
    assert [r["model"] for r in report["models"]] == list(gpu_throughput.SHAPES)
    for row in report["models"]:
        keys = ["rollout_samples_per_s", "update_step_s", "update_tflops", "dppo_vs_grpo_update"]
        keys += ["update_fraction_of_peak", "peak_memory_gb"]
        if row["model"] in gpu_throughput.PIPELINES:
            keys += ["pipeline_samples_per_s", "rollout_vs_pipeline"]
        for key in keys:
            assert math.isfinite(row[key]) and row[key] >= 0, (row["model"], key)
        assert row["update_tflops"] > 0 and row["tokens_per_sample"] > 0
