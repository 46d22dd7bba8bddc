"""Multi-process training: 2 processes (gloo, CPU) against a 1-process run of one global batch.

Tolerance. The 2-process run draws the same global batch (same prompts, same noise per
global sample index, same SDE steps and minibatches) as the 1-process run, so the only
differences are float32 rounding: a forward over half a batch can round differently from
the same rows inside a whole batch (BLAS blocking), the gradient is summed in two parts
and then averaged by an all-reduce, and the per-process ratio / KL statistics are
recombined from their moments. Each of these is a few units in the last place (float32:
~6e-8 relative). They are compared with ``rel=1e-3, abs=1e-6`` for metrics: the loosest
metric is the ratio std (about 2e-4 of values near 1), recombined from per-process float32
means, whose rounding (~6e-8) is ~3e-4 of that std; ``abs=1e-6`` covers ratios (about
10 ulp at 1.0). Parameters (|p| ~ 0.1, Adam steps of ~lr = 1e-2) are compared with
``atol=1e-5``, a thousandth of one optimizer step: a real error (a missing group member, a
wrong minibatch weight, a rank training on other noise) moves them by a whole step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowdppo.config import load_config
from flowdppo.trainer import checkpoint as ckpt
from flowdppo.trainer import watchdog
from flowdppo.trainer.distributed import check_world_size
from flowdppo.trainer.loop import Trainer, TrainingError, metrics_of
from flowdppo.trainer.rollout import ForwardCounter, Shard, rollout
from flowdppo.trainer.update import combine_stats

# 3 prompts x 4 samples = 12: over 2 processes the second group spans both of them. 2 inner
# epochs of 3 minibatches, 2 minibatches per optimizer step (the last one alone).
TINY = [
    "task=digits",
    "train.iterations=4",
    "train.prompts_per_iteration=3",
    "train.group_size=4",
    "train.minibatch_size=4",
    "train.inner_epochs=2",
    "train.grad_accum=2",
    "train.lr=1e-2",
    "sampler.num_steps=4",
    "sampler.num_sde_steps=2",
    "log.eval_samples_per_prompt=1",
    # The reference KL on 2 random samples of each group: the second group spans both
    # processes, so their shares of the draw differ and are padded to one count.
    "log.ref_kl_samples=2",
    "log.eval_every=0",
    "log.checkpoint_every=2",
    "log.tensorboard=false",
]
METRIC_TOL = {"rel": 1e-3, "abs": 1e-6}
PARAM_ATOL = 1e-5
PER_PROCESS = ("time/", "forward_", "backward_calls", "dist/")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the ordinary trainer, one process, one thread."""
    run = tmp_path_factory.mktemp("one") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(None, TINY + [f"log.run_dir={run}"]), run).train()
    finally:
        torch.set_num_threads(threads)
    return run


def _final_params(run: Path, iterations: int = 4) -> dict[str, torch.Tensor]:
    return load_file(run / f"ckpt-{iterations:06d}" / "model.safetensors")


def _assert_same_run(run: Path, reference: Path, world_size: int, iterations: int = 4) -> None:
    rows, ref_rows = metrics_of(run), metrics_of(reference)
    expected = list(range(1, iterations + 1))
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in ref_rows] == expected
    for row, ref in zip(rows, ref_rows):
        shared = {k for k in ref if not k.startswith(PER_PROCESS)}
        assert shared <= set(row), shared - set(row)
        for key in sorted(shared):
            assert row[key] == pytest.approx(ref[key], **METRIC_TOL), (row["iteration"], key)
        # Rank 0 sampled only its share of the global batch.
        assert row["forward_samples/rollout"] * world_size == ref["forward_samples/rollout"]
        assert row["dist/world_size"] == world_size
    params, ref_params = _final_params(run, iterations), _final_params(reference, iterations)
    assert set(params) == set(ref_params)
    moved = max(float((ref_params[k] - p).abs().max()) for k, p in params.items())
    assert moved < PARAM_ATOL
    before = _final_params(reference, iterations // 2)
    # The comparison is not vacuous: training moved the weights by far more than the tolerance.
    assert max(float((ref_params[k] - before[k]).abs().max()) for k in before) > 100 * PARAM_ATOL
    summary = json.loads((run / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    for key, value in ref_summary["after"].items():
        assert summary["after"][key] == pytest.approx(value, **METRIC_TOL), key


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*cmd, "-m", "flowdppo", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(2 processes, gloo)" in done.stdout
    return done


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    _torchrun(*TINY, f"log.run_dir={run}")
    return run


def test_torchrun_two_processes_match_one_process(two_processes, one_process):
    _assert_same_run(two_processes, one_process, world_size=2)
    assert sorted(p.name for p in two_processes.glob("ckpt-*")) == ["ckpt-000002", "ckpt-000004"]


def test_two_process_run_resumes_from_rank0_checkpoint(tmp_path, two_processes, one_process):
    # The state a kill just before the iteration-4 checkpoint leaves: ckpt-000002 is the
    # latest, and metrics, grids and events of iterations 3 and 4 are already written.
    run = tmp_path / "killed"
    shutil.copytree(two_processes, run)
    shutil.rmtree(run / "ckpt-000004")
    (run / "latest").write_text("ckpt-000002\n")
    (run / "summary.json").unlink()
    _torchrun("--resume", str(run))
    _assert_same_run(run, one_process, world_size=2)
    # Resuming reproduces the uninterrupted 2-process run bit for bit (weights, optimizer).
    digest = [
        json.loads((r / "ckpt-000004" / "state.json").read_text())["sha256"]
        for r in (run, two_processes)
    ]
    assert digest[0] == digest[1]


# FSDP (train.distributed=fsdp): parameters, gradients and optimizer state sharded over the
# 2 processes. The gradient is the same average as DDP's (a reduce-scatter instead of an
# all-reduce), so the run is held to the same tolerances against the same 1-process run.
FSDP = ["train.distributed=fsdp"]
# Full fine-tuning, 2 iterations: every weight trains (sharded), the reference for the KL is
# the frozen copy (sharded too). lr 1e-3 keeps the tiny net stable when all of it trains.
FULL = ["model.finetune=full", "train.lr=1e-3", "train.iterations=2", "log.checkpoint_every=1"]


@pytest.fixture(scope="module")
def fsdp_two_processes(matrix):
    return matrix["tiny", "fsdp"]


def test_fsdp_two_processes_match_one_process(fsdp_two_processes, one_process):
    """LoRA under FSDP: peft adapters sharded, the reference is the adapter-disabled net."""
    _assert_same_run(fsdp_two_processes, one_process, world_size=2)
    # Rank 0 wrote the one-process checkpoint format: the same tensor and optimizer entries.
    for name in ("model.safetensors", "optimizer.safetensors"):
        ours = load_file(fsdp_two_processes / "ckpt-000004" / name)
        ref = load_file(one_process / "ckpt-000004" / name)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    meta = [
        json.loads((r / "ckpt-000004" / "state.json").read_text())["optimizer"]
        for r in (fsdp_two_processes, one_process)
    ]
    assert meta[0] == meta[1]


def test_fsdp_run_resumes_under_fsdp_and_in_one_process(tmp_path, fsdp_two_processes, one_process):
    killed = tmp_path / "killed"
    shutil.copytree(fsdp_two_processes, killed)
    shutil.rmtree(killed / "ckpt-000004")
    (killed / "latest").write_text("ckpt-000002\n")
    (killed / "summary.json").unlink()
    # Under FSDP: every process loads rank 0's full checkpoint into its shards, and the run
    # continues bit for bit as the uninterrupted one (same checkpoint checksums).
    fsdp_run = tmp_path / "fsdp"
    shutil.copytree(killed, fsdp_run)
    _torchrun("--resume", str(fsdp_run))
    _assert_same_run(fsdp_run, one_process, world_size=2)
    digest = [
        json.loads((r / "ckpt-000004" / "state.json").read_text())["sha256"]
        for r in (fsdp_run, fsdp_two_processes)
    ]
    assert digest[0] == digest[1]
    # In one process (the ordinary trainer): the FSDP checkpoint is an ordinary checkpoint.
    one = tmp_path / "one"
    shutil.copytree(killed, one)
    cfg = load_config(None, TINY + FSDP + [f"log.run_dir={one}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg, one, resume=True).train()
    finally:
        torch.set_num_threads(threads)
    params, ref_params = _final_params(one), _final_params(one_process)
    assert max(float((ref_params[k] - p).abs().max()) for k, p in params.items()) < PARAM_ATOL


def test_fsdp_full_finetuning_matches_one_process(tmp_path, matrix):
    reference = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(None, TINY + FULL + [f"log.run_dir={reference}"]), reference).train()
    finally:
        torch.set_num_threads(threads)
    _assert_same_run(matrix["full", "fsdp"], reference, world_size=2, iterations=2)


# ---------------------------------------------------------------- every algorithm, DDP and FSDP
# One update loop runs 1 and N processes (trainer/sharding.py): each of the six algorithms,
# with every update option at once (uneven minibatches 5 + 5 + 2, two per optimizer step,
# micro-batches of 2, an EMA), under DDP and FSDP, against its 1-process run. Both sides run
# one thread; float32 rounding (a half batch's forward, a gradient summed in two parts, the
# statistics recombined from per-process moments) stays far below MATRIX_TOL.
ALGORITHMS = ("dppo", "grpo", "cps", "guard", "nft", "dppo+cps")
MATRIX = [
    *TINY,
    "train.iterations=2",
    "train.minibatch_size=5",
    "train.micro_batch=2",
    "train.ema.decay=0.9",
    "log.checkpoint_every=1",
]
MATRIX_TOL = {"rel": 1e-4, "abs": 1e-9}

# ---------------------------------------------------------------- the official trainers' wiring
# Every process drops the same zero-advantage samples (the advantages are the global
# batch's), samples with DiffusionNFT's old model, and replays the same range of steps.
WIRING = [
    *MATRIX,
    "reward.names=[distributed_matrix:thresholded_digit_prob]",
    "reward.adv_eps=1e-4",
    "train.drop_zero_advantage=true",
    "sampler.num_sde_steps=4",
    "sampler.sde_window=[0,1]",
    "train.trained_steps=[0,3]",
    "nft.rollout_model=old",
    "nft.decay_rate=0.3",
]


# ---------------------------------------------------------------- the fast rollout and update
# What the text and shapes tasks recommend: dpm2 on a coarse grid, shared prefixes (whole
# groups per process; the branch step replayed once per group), folded LoRA sampling and
# fused trained steps, under DDP with the matrix's update options.
FAST = [
    *MATRIX,
    "train.prompts_per_iteration=4",
    "sampler.solver=dpm2",
    "sampler.ode_stride=2",
    "sampler.shared_prefix=true",
    "sampler.merge_lora=true",
    "train.fuse_steps=true",
]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """{(algorithm, mode): run dir}: the 2-process runs, all in one torchrun launch (with the
    tiny dppo run under FSDP, LoRA and full fine-tuning: keys ("tiny" / "full", "fsdp")),
    and the 1-process references (mode "one"); the NFT runs are also killed and resumed.
    The "wiring" runs (keys ("wiring", algorithm, mode)): the official trainers' options."""
    sys.path.insert(0, str(Path(__file__).parent))
    from distributed_matrix import own_overrides, run_dir

    out = tmp_path_factory.mktemp("matrix")
    variants = out / "variants.json"
    variants.write_text(
        json.dumps(
            {"tiny": TINY, "full": TINY + FULL, "matrix": MATRIX, "wiring": WIRING, "fast": FAST}
        )
    )
    specs = ["tiny/dppo:fsdp", "full/dppo:fsdp"]
    specs += [f"matrix/{a}:{m}" for a in ALGORITHMS for m in ("ddp", "fsdp")]
    specs += ["resume@matrix/nft:ddp", "resume@matrix/nft:fsdp"]
    specs += [f"wiring/{a}:{m}" for a in ("guard", "nft") for m in ("ddp", "fsdp")]
    specs += ["fast/dppo:ddp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = str(Path(__file__).with_name("distributed_matrix.py"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*cmd, script, str(out), str(variants), *specs],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {(v, "fsdp"): run_dir(out, f"{v}/dppo:fsdp") for v in ("tiny", "full")}
    runs.update(
        {(a, m): run_dir(out, f"matrix/{a}:{m}") for a in ALGORITHMS for m in ("ddp", "fsdp")}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a in ALGORITHMS:
            run = run_dir(out, f"matrix/{a}:one")
            cfg = load_config(None, [*MATRIX, f"algorithm={a}", f"log.run_dir={run}"])
            Trainer(cfg, run).train()
            runs[a, "one"] = run
        for a in ("guard", "nft"):
            run = run_dir(out, f"wiring/{a}:one")
            over = own_overrides(a, WIRING)
            Trainer(load_config(None, [*over, f"algorithm={a}", f"log.run_dir={run}"]), run).train()
            runs.update(
                {("wiring", a, m): run_dir(out, f"wiring/{a}:{m}") for m in ("ddp", "fsdp")}
            )
            runs["wiring", a, "one"] = run
        run = run_dir(out, "fast/dppo:one")
        Trainer(load_config(None, [*FAST, f"log.run_dir={run}"]), run).train()
        runs["fast", "one"], runs["fast", "ddp"] = run, run_dir(out, "fast/dppo:ddp")
    finally:
        torch.set_num_threads(threads)
    return runs


def _assert_same_metrics(run: Path, reference: Path, tol: dict) -> None:
    rows, ref_rows = metrics_of(run), metrics_of(reference)
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in ref_rows]
    for row, ref in zip(rows, ref_rows):
        shared = {k for k in ref if not k.startswith(PER_PROCESS)}
        assert shared <= set(row), shared - set(row)
        for key in sorted(shared - {"first_update_ratio_dev"}):
            assert row[key] == pytest.approx(ref[key], **tol), (row["iteration"], key)
        # The first replay's ratio is 1 up to float32 rounding, which is all this measures
        # (a few units of 6e-8 either way, on both sides).
        for r in (row, ref):
            assert r.get("first_update_ratio_dev", 0.0) < 1e-6


def test_the_fast_rollout_and_update_match_one_process(matrix):
    run, reference = matrix["fast", "ddp"], matrix["fast", "one"]
    _assert_same_metrics(run, reference, MATRIX_TOL)
    rows = metrics_of(run)
    # The prefix ran once per group and the trained steps in one call per pass.
    assert all(r["rollout/forwards_per_sample"] < 4 for r in rows)
    assert rows[-1]["forward_calls/update"] == rows[-1]["backward_calls"]
    # The weights are not held to PARAM_ATOL here: with shared prefixes on this config the
    # two sides' adapters differ by up to 4.4e-5 after two iterations with or without the
    # fold and the fused steps (measured: 4.4e-5 both off, 4.4e-5 folded, 3.8e-5 fused),
    # the rounding of groups computed two at a time instead of four, through Adam.


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_and_option_matches_one_process(matrix, algorithm, mode):
    run, reference = matrix[algorithm, mode], matrix[algorithm, "one"]
    _assert_same_metrics(run, reference, MATRIX_TOL)
    rows = metrics_of(run)
    assert all(r["dist/world_size"] == 2 for r in rows)
    # Micro-batches of 2 over each process's members: more backward passes than minibatches.
    assert rows[-1]["backward_calls"] > metrics_of(reference)[-1]["backward_calls"] / 2
    for name in ("model.safetensors", "ema.safetensors"):
        params = load_file(run / "ckpt-000002" / name)
        ref = load_file(reference / "ckpt-000002" / name)
        assert set(params) == set(ref), name
        assert max(float((ref[k] - p).abs().max()) for k, p in params.items()) < PARAM_ATOL
    # Not vacuous: two iterations moved the weights by far more than the tolerance.
    first = load_file(reference / "ckpt-000001" / "model.safetensors")
    last = load_file(reference / "ckpt-000002" / "model.safetensors")
    assert max(float((last[k] - first[k]).abs().max()) for k in first) > 100 * PARAM_ATOL


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_killed_two_process_nft_run_resumes_bit_exact(matrix, mode):
    """The old model (and the EMA) travel through the checkpoint in full, under FSDP too."""
    run = matrix["nft", mode]
    resumed = run.with_name(run.name + "-resumed")
    digest = [
        json.loads((r / "ckpt-000002" / "state.json").read_text())["sha256"] for r in (run, resumed)
    ]
    assert digest[0] == digest[1]


def test_fsdp_shards_every_block_then_the_network():
    from torch import nn

    from flowdppo.trainer.fsdp import shard_blocks

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_out = nn.ModuleList([nn.Linear(2, 2), nn.Dropout()])

    net = nn.Module()
    net.embed = nn.Linear(2, 2)
    net.blocks = nn.ModuleList([Attention(), Attention()])
    net.norms = nn.ModuleList([nn.Identity()])  # no parameters: nothing to shard
    # The lists inside a block (attention's to_out) belong to that block's shard.
    assert shard_blocks(net) == ["blocks.0", "blocks.1"]
    assert shard_blocks(nn.Linear(2, 2)) == []


def test_global_noise_does_not_depend_on_the_split(toy_overrides):
    """Each process's rows of a sharded rollout equal those rows of the whole rollout."""
    from flowdppo.tasks import get_task
    from flowdppo.trainer.loop import make_sampler_spec

    cfg = load_config(None, toy_overrides)
    model = get_task("toy").build_model(None)
    spec = make_sampler_spec(cfg, 1.0, None)
    prompts = ["bright"] * 3 + ["dark"] * 3
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    steps = [1, 3]
    whole_gen = torch.Generator().manual_seed(5)
    whole = rollout(model, prompts, group, spec, steps, whole_gen, ForwardCounter())
    for start, size in [(0, 2), (2, 2), (4, 2), (0, 3), (3, 3)]:
        gen = torch.Generator().manual_seed(5)
        shard = Shard(start, size, 6)
        part = rollout(
            model,
            prompts[start : start + size],
            group[start : start + size],
            spec,
            steps,
            gen,
            ForwardCounter(),
            shard=shard,
        )
        rows = slice(start, start + size)
        torch.testing.assert_close(part.final, whole.final[rows], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            part.next_states, whole.next_states[:, rows], rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(part.log_probs, whole.log_probs[:, rows], rtol=1e-5, atol=1e-6)
        # The generator advanced exactly as in the whole rollout, so processes stay in step.
        assert torch.equal(gen.get_state(), whole_gen.get_state())


def test_statistics_recombine_over_processes():
    from flowdppo.objectives import _ratio_stats

    g = torch.Generator().manual_seed(0)
    log_ratio = 1e-3 * torch.randn(10, generator=g)
    whole = _ratio_stats(log_ratio)
    keys = list(whole)
    parts = [log_ratio[:3], log_ratio[3:3], log_ratio[3:]]  # the middle process owns none
    counts = torch.tensor([3.0, 0.0, 7.0])
    values = torch.stack(
        [
            torch.tensor(
                [float(v) for v in _ratio_stats(p if p.numel() else log_ratio[:1]).values()]
            )
            for p in parts
        ]
    )
    combined = combine_stats(counts, values, keys)
    for key in keys:
        assert combined[key] == pytest.approx(
            float(whole[key]), rel=1e-6 if key != "ratio_std" else 1e-3
        )


def test_uneven_global_batch_is_rejected_before_work():
    cfg = load_config(None, ["train.prompts_per_iteration=3", "train.group_size=3"])
    with pytest.raises(TrainingError, match="9 samples cannot be split evenly over 2 processes"):
        check_world_size(cfg, 2)
    check_world_size(cfg, 3)


# ---------------------------------------------------------------- preemption and hung ranks
def _start_torchrun(*args: str, fault: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FLOWDPPO_FAULT", None)
    if fault:
        env["FLOWDPPO_FAULT"] = fault
    return subprocess.Popen(
        [*cmd, "-m", "flowdppo", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _workers(agent: int, timeout: float = 120) -> dict[int, int]:
    """rank -> PID of the agent's two workers, once both are training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == agent:
                rank = [e for e in env if e.startswith(b"RANK=")]
                if rank:
                    found[int(rank[0][5:])] = pid
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("the workers never started")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie has ended; its reaper may be slow


def _wait_for_line(stream, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line or text in line:
            return
    raise AssertionError(f"{text!r} never came")


def test_torchrun_sigterm_stops_every_rank_at_one_checkpoint_then_resumes_bit_exact(
    tmp_path, two_processes
):
    run = tmp_path / "run"
    # Both workers get SIGTERM in iteration 1's update (update passes 1-12 on each rank),
    # as SLURM signals every process of a job step.
    proc = _start_torchrun(*TINY, f"log.run_dir={run}", fault="update:5:SIGTERM")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0  # torchrun reports its workers' non-zero exit
    assert "exitcode  : 75" in err, err[-3000:]
    assert err.count("flowdppo: stopped by SIGTERM after iteration 1 of 4") == 1  # rank 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-000001"]
    _torchrun("--resume", str(run))
    digest = [
        json.loads((r / "ckpt-000004" / "state.json").read_text())["sha256"]
        for r in (run, two_processes)
    ]
    assert digest[0] == digest[1]
    untimed = [
        [{k: v for k, v in row.items() if not k.startswith("time/")} for row in metrics_of(r)]
        for r in (run, two_processes)
    ]
    assert untimed[0] == untimed[1]


def test_killing_the_agent_ends_the_workers_within_the_bound(tmp_path):
    proc = _start_torchrun(*TINY, "train.iterations=100000", f"log.run_dir={tmp_path / 'run'}")
    try:
        _wait_for_line(proc.stdout, "iter 2/")
        workers = _workers(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        while not all(_gone(p) for p in workers.values()) and time.monotonic() - start < 30:
            time.sleep(0.05)
        took = time.monotonic() - start
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < watchdog.TICK_S + 2, took  # the documented bound: one tick
    assert "the launcher that started it" in err and "is gone" in err


def test_a_stopped_rank_ends_the_job_within_the_watchdog_bound(tmp_path):
    bound = 4.0
    proc = _start_torchrun(
        *TINY,
        "train.iterations=100000",
        f"train.dist_timeout_s={bound}",
        f"log.run_dir={tmp_path / 'run'}",
    )
    try:
        _wait_for_line(proc.stdout, "iter 2/")
        workers = _workers(proc.pid)
        os.kill(workers[1], signal.SIGSTOP)
        start = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _workers_left(workers):
            os.kill(pid, signal.SIGKILL)
    assert took < bound + 5, took  # the bound, a tick, and torchrun's own shutdown
    line = [x for x in err.splitlines() if x.startswith("error: rank 1 ")]
    assert line, err[-3000:]
    assert f"PID {workers[1]} on" in line[0] and "stopped responding" in line[0]
    assert "it was last in phase '" in line[0] and "Ending the job" in line[0]


def _workers_left(workers: dict[int, int]) -> list[int]:
    return [pid for pid in workers.values() if not _gone(pid)]


def test_the_watchdog_names_the_rank_that_stopped_progressing_first(monkeypatch):
    """Heartbeats keep coming but no forward pass or checkpoint step happens: a deadlock."""
    import socket

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    ended = []
    monkeypatch.setattr(
        watchdog.Watchdog, "_end", lambda self, reason, culprit=None: ended.append(reason)
    )
    host = socket.gethostname()
    seq = iter(range(1, 10**6))

    def rank1_beats(seconds: float, rank0_progresses: bool) -> None:
        """Rank 1 alive and beating, frozen in its reward phase."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not ended:
            if rank0_progresses:
                watchdog.mark("update")
            beat = {"seq": next(seq), "beats": 0, "phase": "reward", "iteration": 2}
            store.set("flowdppo/heartbeat/0/1", json.dumps(beat))
            time.sleep(0.02)

    guard = watchdog.Watchdog(0, [(host, 1), (host, 2)], 0.5, lambda: "hint")
    guard.start()
    try:
        rank1_beats(0.3, rank0_progresses=True)
        assert not ended  # one process progressing is a job progressing
        rank1_beats(5, rank0_progresses=False)  # now rank 0 waits for rank 1 too
    finally:
        guard.stop()
    assert ended and ended[0].startswith("no process made progress for 0.5 s")
    assert "rank 1 (PID 2 on" in ended[0] and "phase 'reward' of iteration 3" in ended[0]


@pytest.mark.parametrize("algorithm", ["guard", "nft"])
def test_dropped_samples_old_model_rollouts_and_trained_steps_match_one_process(matrix, algorithm):
    sys.path.insert(0, str(Path(__file__).parent))
    from distributed_matrix import own_overrides

    reference = matrix["wiring", algorithm, "one"]
    rows = metrics_of(reference)
    assert sum(r["update/dropped_samples"] for r in rows) > 0  # not vacuous
    for mode in ("ddp", "fsdp"):
        _assert_same_metrics(matrix["wiring", algorithm, mode], reference, MATRIX_TOL)
    if algorithm == "guard":
        assert all(r["update/trained_step_mask"] == 0b0111 for r in rows)
    else:
        assert all(r["rollout/old_model"] == 1 for r in rows)
    assert own_overrides(algorithm, WIRING) != WIRING  # each drops the other's options
