"""One Flow-GRPO iteration of the reference trainer and of ours, side by side, at matched work.

The reference is yifan123/flow_grpo's ``scripts/train_sd3.py``, run from a checkout given on
the command line: nothing of it is in this repository. Its files are copied to a temporary
directory and ``benchmarks/peer_flow_grpo.patch`` is applied there; the patch's header says
what each hunk does (skip the evaluation at epoch 0, stop after ``config.num_epochs``
epochs, print each epoch's wall time). Everything else is configured through a config file
this script writes into the copy (``config/peer_cpu.py``, built on their ``config/base.py``)
and environment variables (``WANDB_MODE=disabled``, one thread).

Both sides train the same tiny random SD3 pipeline (``tests/tiny_pipelines.build_sd3``,
saved once and loaded by both) with matched work: 10 sampling steps, every step stochastic
(noise level 0.7), 4 prompts x 4 samples in one rollout batch, the first T steps trained
(T = 3, and 9 with ``--trained-steps 3,9``) in one minibatch of 16 with one optimizer
step, LoRA rank 32 / alpha 64 on the same eight attention projections, CFG 4.5 in sampling
and training (``--guidance 1`` turns it off on both), no KL term (their ``train.beta`` 0,
our ``objective.beta`` 0) and no reference-KL logging, float32, CPU, one torch thread.
The reward on both sides is JPEG compressibility (minus the JPEG size at quality 95, each
side its own implementation): a cheap, deterministic function of the image, so the
reward is not what is measured.

Each run is a fresh subprocess of ``--iterations`` iterations (default 2: the first is a
warm-up, the time is the mean of the rest). An iteration's wall and process CPU time are,
for theirs, the patch's stamps from the start of its sampling section to the end of its training loop (prompt
encoding, rollout with decoding, reward, advantages, their wandb image-logging block with
wandb disabled, update); for ours, ``Trainer.run_iteration`` (prompts, rollout with
decoding, reward, advantages, update). Model loading, LoRA setup and evaluation are
outside on both sides. Runs alternate order within pairs (A B, then B A, ...) so a shared
machine's load falls on both; the result is the median of the per-pair ratios
ours / theirs, in wall time and in CPU time. About 4 minutes per setting and 3 pairs on
2 shared cores. Transformer forwards are counted by wrapping
``SD3Transformer2DModel.forward`` in each subprocess (calls, rows through the network,
calls under gradient). Memory is the subprocess's peak resident set (``ru_maxrss``) and
its resident set at the first transformer forward (models loaded, iteration starting).

Our side takes any config override (``--ours-override sampler.solver=dpm2``), theirs any
ml_collections flag (``--theirs-flag=--config.sample.noise_level=0.8``), so rollout
changes are measured with the same script.

    pip install ml_collections absl-py wandb -c constraints-cpu.txt   # their imports
    git clone https://github.com/yifan123/flow_grpo /tmp/flow_grpo
    python benchmarks/peer_flow_grpo.py /tmp/flow_grpo --pairs 3
    python benchmarks/peer_flow_grpo.py /tmp/flow_grpo --trained-steps 3,9 --pairs 5
    python benchmarks/peer_flow_grpo.py /tmp/flow_grpo --ours-override sampler.solver=dpm2
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "benchmarks" / "peer_flow_grpo.patch"
DEFAULT_OUT = ROOT / "docs" / "results" / "peer_flow_grpo.json"
#: The modules their training script imports that a flowdppo install may lack.
THEIR_IMPORTS = {"ml_collections": "ml_collections", "absl": "absl-py", "wandb": "wandb"}
PROMPTS = ["a red cat", "two dogs on grass", "a blue house", "a green apple"]
NUM_STEPS = 10
PROMPTS_PER_ITERATION = 4
GROUP_SIZE = 4
SAMPLES = PROMPTS_PER_ITERATION * GROUP_SIZE
TEXT_TOKENS = 128  # their compute_text_embeddings' T5 length; ours via model.max_sequence_length

#: Their config, written into the copy as config/peer_cpu.py (our settings, their keys).
THEIR_CONFIG = '''"""flowdppo's benchmarks/peer_flow_grpo.py: matched work on a tiny SD3 pipeline."""
import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "base", os.path.join(os.path.dirname(__file__), "base.py")
)
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def get_config():
    config = base.get_config()
    config.pretrained.model = {pipe!r}
    config.dataset = {dataset!r}
    config.prompt_fn = "general_ocr"  # their text-file prompt dataset (train.txt)
    config.reward_fn = ml_collections.ConfigDict({{"jpeg_compressibility": 1.0}})
    config.logdir = {logdir!r}
    config.save_dir = {logdir!r}
    config.run_name = "peer"
    config.resolution = {resolution}
    config.mixed_precision = "no"  # float32
    config.use_lora = True
    config.sample.num_steps = {num_steps}
    config.sample.guidance_scale = {guidance}
    config.sample.noise_level = 0.7
    config.sample.train_batch_size = {samples}  # one rollout batch of every sample
    config.sample.num_image_per_prompt = {group_size}
    config.sample.num_batches_per_epoch = 1
    config.sample.test_batch_size = 1
    config.sample.global_std = True
    config.train.batch_size = {samples}
    config.train.gradient_accumulation_steps = 1
    config.train.num_inner_epochs = 1
    config.train.timestep_fraction = {fraction!r}  # int(num_steps * fraction) trained steps
    config.train.cfg = {cfg}
    config.train.beta = 0.0
    config.train.ema = False
    config.per_prompt_stat_tracking = True
    config.eval_freq = 0  # patched: 0 skips the evaluation
    config.save_freq = 10**9
    config.num_epochs = {iterations}  # patched: stop after this many epochs
    return config
'''


# ---------------------------------------------------------------- inside a subprocess
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _count_forwards() -> dict:
    """Wrap SD3Transformer2DModel.forward: calls, rows, calls under gradient."""
    import torch
    from diffusers import SD3Transformer2DModel

    stats = {"calls": 0, "rows": 0, "grad_calls": 0, "rss_first_forward_mib": None}
    original = SD3Transformer2DModel.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if stats["calls"] == 0:  # what the work is made of, to check that it matches
            stats["rss_first_forward_mib"] = _rss_mib()
            stats["latents"] = list(hidden.shape)
            stats["text_tokens"] = kwargs["encoder_hidden_states"].shape[1]
            stats["trainable_parameters"] = sum(
                p.numel() for p in self.parameters() if p.requires_grad
            )
        stats["calls"] += 1
        stats["rows"] += hidden.shape[0]
        stats["grad_calls"] += int(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    SD3Transformer2DModel.forward = forward
    return stats


def _child(side: str, spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    stats = _count_forwards()
    times: list[tuple[float, float]] = []  # (wall, process CPU) seconds per iteration
    phases: list[dict] = []  # ours: the trainer's time per phase, per iteration
    if side == "theirs":
        copy = spec["copy"]
        os.chdir(copy)
        sys.path.insert(0, copy)
        sys.argv = ["scripts/train_sd3.py", "--config=config/peer_cpu.py", *spec["flags"]]
        stdout = sys.stdout

        class Stamps:  # the patch prints "PEER_ITERATION_S wall cpu" after each epoch
            def write(self, text: str) -> int:
                for line in text.splitlines():
                    if line.startswith("PEER_ITERATION_S "):
                        wall, cpu = line.split()[1:]
                        times.append((float(wall), float(cpu)))
                return stdout.write(text)

            def flush(self) -> None:
                stdout.flush()

        sys.stdout = Stamps()
        try:
            runpy.run_path("scripts/train_sd3.py", run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise
        finally:
            sys.stdout = stdout
    else:
        sys.path.insert(0, str(ROOT / "src"))
        from flowdppo.config import load_config
        from flowdppo.trainer.loop import Trainer

        cfg = load_config(spec["recipe"], spec["overrides"])
        trainer = Trainer(cfg, Path(spec["run_dir"]))
        for _ in range(spec["iterations"]):
            start = time.perf_counter(), time.process_time()
            metrics = trainer.run_iteration()
            times.append((time.perf_counter() - start[0], time.process_time() - start[1]))
            trainer.iteration += 1
            phases.append({k: v for k, v in metrics.items() if k.startswith("time/")})
    result = {
        "iteration_s": times,
        "phases_s": phases,
        "forwards": stats,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("PEER_RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the parent
def _fail(message: str) -> NoReturn:
    raise SystemExit(f"error: {message}")


def check_inputs(args) -> str:
    """Every input problem as one error before any work; returns their commit."""
    script = args.checkout / "scripts" / "train_sd3.py"
    if not script.is_file():
        _fail(
            f"{args.checkout} has no scripts/train_sd3.py: give the path of a checkout of "
            "https://github.com/yifan123/flow_grpo"
        )
    missing = [pip for mod, pip in THEIR_IMPORTS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        _fail(
            f"their training script imports {', '.join(missing)}, not installed here: "
            f"pip install {' '.join(missing)} -c constraints-cpu.txt"
        )
    for item in args.ours_override:
        if "=" not in item:
            _fail(f"--ours-override {item!r} is not key=value (e.g. sampler.solver=dpm2)")
    for t in args.trained_steps:
        if not 1 <= t <= NUM_STEPS:
            _fail(f"--trained-steps {t}: each must be 1-{NUM_STEPS} (of {NUM_STEPS} steps)")
    if args.pairs < 1 or args.iterations < 1:
        _fail("--pairs and --iterations must be at least 1")
    head = subprocess.run(
        ["git", "-C", str(args.checkout), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return head.stdout.strip() if head.returncode == 0 else "unknown (not a git checkout)"


def their_copy(checkout: Path, dest: Path) -> Path:
    """Their package, scripts and configs in ``dest``, with the patch applied."""
    for part in ("flow_grpo", "scripts", "config"):
        shutil.copytree(checkout / part, dest / part)
    # A repository of its own, so that git apply patches the copy wherever it lies.
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    applied = subprocess.run(["git", "apply", str(PATCH)], capture_output=True, text=True, cwd=dest)
    if applied.returncode != 0:
        _fail(
            f"{PATCH.name} does not apply to {checkout}/scripts/train_sd3.py "
            f"({applied.stderr.strip()}); it was made against flow_grpo commit ac4c86e: "
            "check that commit out"
        )
    return dest


def run_side(side: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        _fail(f"the {side} run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1].removeprefix("PEER_RESULT "))


def summarize(run: dict, iterations: int) -> dict:
    """A run's iteration wall and CPU time (the mean after the first when there are
    several) and its forwards and memory per iteration."""
    times = run["iteration_s"]
    if len(times) != iterations:
        _fail(f"expected {iterations} iteration times, got {len(times)}")
    steady = times[1:] or times
    f = run["forwards"]
    return {
        "iteration_s": sum(w for w, _ in steady) / len(steady),
        "iteration_cpu_s": sum(c for _, c in steady) / len(steady),
        "all_iteration_s": times,
        "phases_s": run["phases_s"],
        "forward_calls": f["calls"] / iterations,
        "forward_rows": f["rows"] / iterations,
        "forward_calls_with_grad": f["grad_calls"] / iterations,
        "peak_rss_mib": run["peak_rss_mib"],
        "rss_first_forward_mib": f["rss_first_forward_mib"],
        "shape": {k: f[k] for k in ("latents", "text_tokens", "trainable_parameters")},
    }


def measure(args, t: int, pipe: Path, work: Path, copy: Path) -> dict:
    dataset = work / "prompts"
    guidance = args.guidance
    (copy / "config" / "peer_cpu.py").write_text(
        THEIR_CONFIG.format(
            pipe=str(pipe),
            dataset=str(dataset),
            logdir=str(work / "their_logs"),
            resolution=args.resolution,
            num_steps=NUM_STEPS,
            guidance=guidance,
            samples=SAMPLES,
            group_size=GROUP_SIZE,
            fraction=(t + 0.5) / NUM_STEPS,
            cfg=guidance > 1,
            iterations=args.iterations,
        )
    )
    overrides = [
        f"model.path={pipe}",
        f"data.train_prompts={dataset / 'train.txt'}",
        f"model.resolution={args.resolution}",
        "model.dtype=float32",
        "model.device=cpu",
        f"model.max_sequence_length={TEXT_TOKENS}",
        "reward.names=[jpeg_compressibility]",
        f"sampler.num_steps={NUM_STEPS}",
        f"sampler.num_sde_steps={NUM_STEPS}",
        f"sampler.guidance_scale={guidance}",
        f"train.prompts_per_iteration={PROMPTS_PER_ITERATION}",
        f"train.group_size={GROUP_SIZE}",
        f"train.minibatch_size={SAMPLES}",
        "train.grad_accum=1",
        "train.micro_batch=null",
        f"train.trained_steps=[0,{t}]",
        "objective.beta=0",
        f"train.iterations={args.iterations}",
        "train.threads=1",
        "log.ref_kl=false",
        "log.eval_every=0",
        "log.tensorboard=false",
        *args.ours_override,
    ]
    sys.path.insert(0, str(ROOT / "src"))
    from flowdppo.config import ConfigError, load_config

    try:
        load_config("sd3/grpo", overrides)
    except ConfigError as exc:
        _fail(f"--ours-override: {exc}")
    pairs = []
    for p in range(args.pairs):
        order = ("ours", "theirs") if p % 2 == 0 else ("theirs", "ours")
        runs = {}
        for i, side in enumerate(order):
            spec = {"copy": str(copy), "flags": args.theirs_flag}
            if side == "ours":
                spec = {
                    "recipe": "sd3/grpo",
                    "overrides": overrides,
                    "run_dir": str(work / f"ours-{t}-{p}"),
                    "iterations": args.iterations,
                }
            runs[side] = summarize(run_side(side, spec), args.iterations)
            print(f"  T={t} pair {p + 1} run {i + 1}: {side} {runs[side]['iteration_s']:.3f} s")
        ratio = runs["ours"]["iteration_s"] / runs["theirs"]["iteration_s"]
        cpu_ratio = runs["ours"]["iteration_cpu_s"] / runs["theirs"]["iteration_cpu_s"]
        pairs.append({"order": list(order), **runs, "ratio": ratio, "cpu_ratio": cpu_ratio})
        print(f"  T={t} pair {p + 1}: ours / theirs = {ratio:.3f} (CPU time {cpu_ratio:.3f})")
    ratios = sorted(x["ratio"] for x in pairs)
    cpu_ratios = sorted(x["cpu_ratio"] for x in pairs)

    def median_of(side: str, key: str) -> float:
        return statistics.median(x[side][key] for x in pairs)

    keys = (
        "iteration_s",
        "iteration_cpu_s",
        "forward_calls",
        "forward_rows",
        "forward_calls_with_grad",
    )
    keys += ("peak_rss_mib", "rss_first_forward_mib")
    shapes = {side: pairs[0][side]["shape"] for side in ("ours", "theirs")}
    if shapes["ours"] != shapes["theirs"]:
        print(f"  note: the work differs: {shapes}")
    return {
        "trained_steps": t,
        "median_ratio": statistics.median(ratios),
        "median_cpu_ratio": statistics.median(cpu_ratios),
        "cpu_ratios": cpu_ratios,
        "same_shapes": shapes["ours"] == shapes["theirs"],
        "shapes": shapes,
        "ratios": ratios,
        "ours": {k: median_of("ours", k) for k in keys},
        "theirs": {k: median_of("theirs", k) for k in keys},
        "our_overrides": overrides,
        "pairs": pairs,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], json.loads(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkout", type=Path, help="a checkout of yifan123/flow_grpo")
    ap.add_argument("--pairs", type=int, default=3, help="interleaved pairs per setting")
    ap.add_argument(
        "--trained-steps",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[3],
        help="comma-separated trained steps of the 10 (default 3; e.g. 3,9)",
    )
    ap.add_argument(
        "--iterations",
        type=int,
        default=2,
        help="iterations per run; a run's time is the mean after the first (a warm-up) "
        "when there are several",
    )
    ap.add_argument("--guidance", type=float, default=4.5, help="CFG scale, both sides (1: off)")
    ap.add_argument("--resolution", type=int, default=64, help="pixels (latent: half)")
    ap.add_argument("--layers", type=int, default=2, help="tiny SD3 transformer blocks")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--head-dim", type=int, default=16, help="head size (width heads x this)")
    ap.add_argument(
        "--ours-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a flowdppo config override for our side (repeatable), e.g. sampler.solver=dpm2",
    )
    ap.add_argument(
        "--theirs-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="an extra flag for their script (repeatable), e.g. --theirs-flag=--config.seed=1",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    args = ap.parse_args()
    commit = check_inputs(args)
    sys.path.insert(0, str(ROOT / "tests"))
    import diffusers
    import torch
    from tiny_pipelines import build_sd3

    results = {
        "command": "python benchmarks/peer_flow_grpo.py " + " ".join(sys.argv[1:]),
        "flow_grpo_commit": commit,
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical CPUs (shared with other jobs)",
        "load_average_start": os.getloadavg(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "pipeline": {
            "layers": args.layers,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "resolution": args.resolution,
            "text_tokens": f"77 CLIP + {TEXT_TOKENS} T5",
        },
        "work": {
            "sampling_steps": NUM_STEPS,
            "prompts": PROMPTS_PER_ITERATION,
            "samples_per_prompt": GROUP_SIZE,
            "guidance": args.guidance,
            "lora": "rank 32, alpha 64, attention projections",
            "reward": "jpeg_compressibility (each side's own)",
            "iterations_per_run": args.iterations,
        },
        "ours_overrides": args.ours_override,
        "theirs_flags": args.theirs_flag,
        "memory": "ru_maxrss of each run's subprocess (peak) and its RSS at the first "
        "transformer forward",
        "settings": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy = their_copy(args.checkout, work / "flow_grpo")
        dataset = work / "prompts"
        dataset.mkdir()
        (dataset / "train.txt").write_text("\n".join(PROMPTS) + "\n")
        (dataset / "test.txt").write_text(PROMPTS[0] + "\n")
        pipe = build_sd3(work / "sd3", layers=args.layers, heads=args.heads, head_dim=args.head_dim)
        for t in args.trained_steps:
            results["settings"].append(measure(args, t, pipe, work, copy))
    results["load_average_end"] = os.getloadavg()
    for s in results["settings"]:
        o, th = s["ours"], s["theirs"]
        print(
            f"T={s['trained_steps']}: ours / theirs = {s['median_ratio']:.3f} "
            f"(pairs {', '.join(f'{r:.3f}' for r in s['ratios'])}; CPU time "
            f"{s['median_cpu_ratio']:.3f}); "
            f"iteration {o['iteration_s']:.2f} s vs {th['iteration_s']:.2f} s; "
            f"forwards {o['forward_calls']:g} vs {th['forward_calls']:g} "
            f"(rows {o['forward_rows']:g} vs {th['forward_rows']:g}); "
            f"peak RSS {o['peak_rss_mib']:.0f} vs {th['peak_rss_mib']:.0f} MiB"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
