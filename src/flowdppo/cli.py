"""Command line: ``flowdppo train | sample | eval | export-lora | pretrain | compare | report``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from flowdppo.verbosity import echo, phase, show_phases

EPILOG_TRAIN = """examples:
  flowdppo train                                  # the default Flow-DPPO run on digits
  flowdppo train --task shapes                    # Flow-DPPO on the compositional shapes task
  flowdppo train --task text                      # Flow-DPPO on text rendering (OCR reward)
  flowdppo train configs/digits/grpo.yaml         # a recipe
  flowdppo train algorithm=dppo+cps train.iterations=20 objective.dppo_threshold=1e-5
  flowdppo train configs/digits/nft.yaml          # DiffusionNFT (also guard: GRPO-Guard)
  flowdppo train --resume runs/dppo-digits-20261124-120000
  flowdppo train --resume runs/dppo-digits-20261124-120000 train.iterations=400   # train further
  flowdppo train train.ema.decay=0.99             # evaluate, sample and export an EMA of the weights
  flowdppo train configs/sd3/dppo.yaml model.path=/models/sd35m data.train_prompts=prompts.txt
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowdppo",
        description="Online RL for flow-matching generators: Flow-DPPO, Flow-GRPO, Flow-CPS, "
        "GRPO-Guard, DiffusionNFT.",
    )
    from flowdppo import __version__

    p.add_argument("--version", action="version", version=f"flowdppo {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose",
        action="store_true",
        help="show the warnings, logs and progress bars of transformers, diffusers and peft",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    t = add(
        "train",
        help="train a policy (no arguments: the default Flow-DPPO digits run)",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG] [key=value ...]",
        help="an optional recipe name (sd3/grpo; `flowdppo recipes` lists them) or YAML file, "
        "then overrides such as train.lr=3e-4",
    )
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config, each key with its meaning, and exit (trains nothing)",
    )
    t.add_argument(
        "--task",
        help="a built-in task (digits, shapes, text) with its recommended budget; same as task=NAME "
        "plus that budget, under any CONFIG and overrides",
    )

    add("recipes", help="list the recipes that ship with the package, one line each")

    s = add("sample", help="sample images from a trained run or a task's base model")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="a training run directory")
    src.add_argument("--task", help="a built-in task's base model (e.g. digits)")
    s.add_argument("--prompts", required=True, help="comma-separated prompts, e.g. three,seven")
    s.add_argument("-n", type=int, default=8, help="samples per prompt (default 8)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    s.add_argument("--guidance", type=float, default=None, help="guidance scale")
    s.add_argument("--solver", choices=SOLVER_CHOICES, default=None, help=SOLVER_HELP)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--out",
        default="samples.png",
        help="output PNG grid (default samples.png; more than 16 rows: -p2.png... pages); "
        "videos also as .gif and .mp4 beside it",
    )
    s.add_argument("--raw-weights", action="store_true", help=RAW_WEIGHTS)

    e = add(
        "eval",
        help="reward and KL to the reference on trained and held-out prompts; with --steps, "
        "reward and time per image of the base and trained models at each step count",
    )
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("-n", type=int, default=None, help="samples per prompt (default: the run's)")
    e.add_argument("--out", default=None, help="write the metrics as JSON here")
    e.add_argument(
        "--json", action="store_true", help="print the metrics as JSON instead of the table"
    )
    e.add_argument(
        "--steps",
        default=None,
        metavar="N[,N...]",
        help="sampling step counts, e.g. 4,10,20,40: reward on the trained and the held-out "
        "prompts apart, against NFE, and milliseconds per image of the base and trained "
        "models, written to RUN_DIR/inference_cost.json",
    )
    e.add_argument("--solver", choices=SOLVER_CHOICES, default=None, help=SOLVER_HELP)
    e.add_argument("--raw-weights", action="store_true", help=RAW_WEIGHTS)

    x = add(
        "export-lora",
        help="write a diffusers run's LoRA where pipeline.load_lora_weights(OUT_DIR) reads it",
    )
    x.add_argument("run", metavar="RUN_DIR", help="a training run of a diffusers model")
    x.add_argument("out", metavar="OUT_DIR", help="output directory")
    x.add_argument("--raw-weights", action="store_true", help=RAW_WEIGHTS)

    r = add("pretrain", help="pretrain a built-in task's base model and reward model")
    r.add_argument("--task", default="digits")
    r.add_argument(
        "--out",
        default=None,
        help="output folder (default pretrained/TASK here; the installed package's assets are "
        "replaced only when --out names their folder)",
    )
    r.add_argument("--seed", type=int, default=0)

    c = add(
        "compare",
        help="run several algorithms x seeds on one task and budget; tables and plots",
        epilog=EPILOG_COMPARE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("config", metavar="CONFIG", help="an experiment file or a run config")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="base config overrides")
    c.add_argument("--algorithms", default=None, help="comma-separated (default: the file's)")
    c.add_argument("--seeds", default=None, help="a count (3: seeds 0,1,2) or a list (0,5,7)")
    c.add_argument("--jobs", type=int, default=1, help="runs in parallel (0: in this process)")
    c.add_argument("--out", default=None, help="output folder (default runs/compare-...)")
    c.add_argument(
        "--quick",
        action="store_true",
        help="the experiment's small budget (digits experiments only; the shapes experiments "
        "have none: 15 iterations moved the reward less than the evaluation noise)",
    )
    c.add_argument("--reuse", action="store_true", help="keep finished runs found in --out")

    rp = add(
        "report",
        help="one self-contained report.html of runs or a compare folder (plots, samples)",
        epilog=EPILOG_REPORT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument(
        "paths", nargs="+", metavar="RUN_DIR", help="run directories or one compare folder"
    )
    rp.add_argument(
        "--out",
        default=None,
        help="output HTML (default: report.html in the run or compare folder; for several "
        "runs, in the current folder)",
    )
    return p


RAW_WEIGHTS = "use the trained weights themselves, not their EMA (runs with train.ema)"
SOLVER_CHOICES = ("euler", "dpm2")  # flowdppo.solvers.SOLVERS, without importing torch
SOLVER_HELP = (
    "ODE solver (default: the run's log.eval_solver or sampler.solver, euler for a task's "
    "base model): euler, "
    "or dpm2, the second-order multistep DPM-Solver++ that DiffusionNFT samples with "
    "(how close each gets to the many-step limit, per schedule: docs/method.md, ODE solvers)"
)

EPILOG_REPORT = """examples:
  flowdppo report runs/dppo-digits-20261124-120000
  flowdppo report runs/dppo-digits-* runs/grpo-digits-* --out digits.html
  flowdppo report runs/compare-single_reward_digits-quick-20261124-130000
Open the file in any browser; it needs no network and no file beside it.
"""


def _report(ns) -> int:
    from flowdppo.report import write_report

    out = write_report(ns.paths, ns.out)
    echo(f"wrote {out}")
    return 0


EPILOG_COMPARE = """examples:
  flowdppo compare configs/experiments/single_reward_digits.yaml --quick --jobs 2
  flowdppo compare configs/digits/dppo.yaml --algorithms dppo,grpo --seeds 3 train.iterations=60
Writes results.md, results.csv, runs.csv, compute.csv and PNG plots into --out; exits 1 if any
run failed. Reward against compute: compare.compute_budget=N (training forward-equivalents)
and compare.kl_bound=X (KL in 1e-3 per SDE step, or none) choose where "best at equal compute" is read;
with --reuse on a finished folder the report is rewritten without training.
"""


def _compare(ns) -> int:
    from flowdppo.compare import compare

    code, _ = compare(
        ns.config,
        algorithms=ns.algorithms,
        seeds=ns.seeds,
        quick=ns.quick,
        overrides=ns.overrides,
        out=ns.out,
        jobs=ns.jobs,
        reuse=ns.reuse,
    )
    return code


def _train(ns) -> int:
    from flowdppo.config import ConfigError, load_config

    if ns.print_config and ns.resume:
        raise ConfigError(
            "--print-config shows a new run's config; a run's own is RUN_DIR/config.yaml"
        )
    if not ns.resume:
        # The config first: a bad key or file is one line before the trainer (and torch)
        # is imported.
        path = None
        overrides = list(ns.args)
        if overrides and "=" not in overrides[0]:
            path = overrides.pop(0)
        base = sde_base = None
        if ns.task:
            from flowdppo.tasks import get_task

            extra = get_task(ns.task).extra
            base, sde_base = extra.get("recommended", {}), extra.get("recommended_sde")
            overrides.insert(0, f"task={ns.task}")
        cfg = load_config(path, overrides, base=base, sde_base=sde_base)
        if ns.print_config:
            from flowdppo.config import explain_config

            echo(explain_config(cfg).rstrip("\n"))
            return 0
    # A line per slow start-up phase, from one process of a multi-process job.
    show_phases(os.environ.get("RANK", "0") == "0")
    phase("importing the trainer")
    from flowdppo.trainer import distributed
    from flowdppo.trainer.loop import Trainer
    from flowdppo.trainer.preemption import EXIT_PREEMPTED, Preempted

    multi = distributed.launched_distributed()  # torchrun / accelerate launch: one per rank
    if multi:
        Trainer = distributed.DistributedTrainer  # noqa: N806
    if ns.resume:
        from flowdppo.runs import resume_config

        if ns.task or (ns.args and "=" not in ns.args[0]):
            raise ConfigError(
                "--resume takes the run's own config; drop the other arguments (the one "
                "override it takes is train.iterations=N, to continue a run further)"
            )
        run_dir = Path(ns.resume)
        cfg = resume_config(run_dir, ns.args)
        trainer = Trainer(cfg, run_dir, resume=True)
    else:
        run_dir = Path(cfg.log.run_dir or f"runs/{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if multi:  # rank 0 names the run, so a clock tick between processes cannot split it
            distributed.init_distributed(cfg.train.dist_backend, cfg.train.dist_timeout_s)
            run_dir = Path(distributed.broadcast_text(str(run_dir)))
        trainer = Trainer(cfg, run_dir)
    rank0 = getattr(trainer, "rank", 0) == 0
    if trainer.finished:
        trainer.train()  # returns at once, releasing the run
        if rank0:
            echo(
                f"flowdppo: {run_dir} is finished ({trainer.iteration} of "
                f"{trainer.cfg.train.iterations} iterations); nothing to do. Its results: "
                f"{run_dir / 'summary.json'}; to train it further: flowdppo train --resume "
                f"{run_dir} train.iterations=N with N > {trainer.cfg.train.iterations}",
            )
        distributed.finish_distributed()
        return 0
    if rank0:
        from flowdppo.config import describe_trust_region

        echo(
            f"flowdppo: {cfg.algorithm} on {cfg.task}, {cfg.train.iterations} iterations -> "
            f"{run_dir}"
            + (f" ({trainer.world_size} processes, {trainer.backend})" if multi else "")
            + f"\n  {describe_trust_region(trainer.cfg)}",
        )
    try:
        summary = trainer.train()
    except Preempted as stopped:
        if rank0:
            print(f"flowdppo: {stopped}", file=sys.stderr, flush=True)
        distributed.finish_distributed()
        return EXIT_PREEMPTED
    if rank0:
        _print_summary(summary, trainer.cfg)
    distributed.finish_distributed()
    return 0


def _print_before_after(before: dict, after: dict) -> None:
    """The evaluation table ``train`` ends with and ``eval`` prints: trained prompts, then
    held-out ones, each metric before (the base model) -> after; "-" where no base value.
    The KL to the reference is in the unit of every surface (flowdppo.units); its sum along
    the path stays in summary.json and ``--json``."""
    from flowdppo.units import KL_LABEL, kl_shown

    for split, title in (("train", "trained prompts"), ("heldout", "held-out prompts")):
        kl = f"eval/{split}/kl_ref/mean"
        rows = [(f"{kl} ({KL_LABEL})", kl, kl_shown)] if kl in after else []
        rows += [
            (k, k, "{:.4f}".format)
            for k in sorted(after)
            if k.startswith(f"eval/{split}/") and "/reward/" in k
        ]
        if not rows:
            continue
        width = max(len(label) for label, _, _ in rows)
        echo(f"\n{title} (ODE samples, fixed noise)")
        echo(f"  {'':<{width}} {'before':>8} -> after")
        for label, key, show in rows:
            b = show(before[key]) if key in before else "-"
            echo(f"  {label:<{width}} {b:>8} -> {show(after[key])}")


def _print_summary(summary: dict, cfg) -> None:
    _print_before_after(summary["before"], summary["after"])
    times = ", ".join(f"{k} {v:.1f}s" for k, v in summary["time_per_phase_s"].items())
    echo(f"time per phase: {times}")
    run = summary["run_dir"]
    logs = [f"{run}/metrics.jsonl"] + ([f"{run}/tensorboard"] if cfg.log.tensorboard else [])
    logs += [f"wandb ({cfg.log.wandb_project})"] if cfg.log.wandb else []
    echo(
        f"logs: {', '.join(logs)}; grids: {run}/grids/; checkpoints: {run}/ckpt-*; "
        f"summary: {run}/summary.json"
    )
    echo(f"see it in a browser: flowdppo report {run}")


def _check_at_least(option: str, value, low: float, what: str) -> None:
    """One plain error for a sampling option out of range (before any model loads)."""
    if value is not None and not (math.isfinite(value) and value >= low):
        raise ValueError(f"{option} must be at least {low:g} ({what}), got {value!r}")


def _check_sampling_options(ns) -> None:
    _check_at_least("-n", ns.n, 1, "samples per prompt")
    steps = ns.steps if isinstance(ns.steps, list) else [ns.steps]
    for n in steps:
        _check_at_least("--steps", n, 1, "sampling steps")
    _check_at_least("--guidance", getattr(ns, "guidance", None), 1, "1: no guidance")


def _step_counts(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts:
        raise ValueError(
            f"--steps takes step counts separated by commas (e.g. 4,10,20,40), got {text!r}"
        )
    return counts


def _sample(ns) -> int:
    import torch

    from flowdppo.trainer.budget import check_sample_memory
    from flowdppo.trainer.loop import make_sampler_spec
    from flowdppo.trainer.media import write_grid
    from flowdppo.trainer.rollout import ForwardCounter, sample

    _check_sampling_options(ns)
    prompts = [p.strip() for p in ns.prompts.split(",") if p.strip()]
    if not prompts:
        raise ValueError(f"--prompts names no prompt ({ns.prompts!r}); e.g. --prompts three,seven")
    if Path(ns.out).is_dir() or not Path(ns.out).suffix:
        raise ValueError(
            f"--out {ns.out!r} is not a file name with an extension (e.g. samples.png)"
        )
    if ns.run:
        from flowdppo.runs import load_run

        cfg, task, model, _ = load_run(ns.run, raw_weights=ns.raw_weights)
    else:
        from flowdppo.config import Config
        from flowdppo.tasks import get_task

        task = get_task(ns.task)
        cfg = Config(task=ns.task)
        model = task.build_model(None)
    if ns.steps is not None:
        cfg.sampler.num_steps = ns.steps
        cfg.sampler.num_sde_steps = 1
    if ns.guidance is not None:
        cfg.sampler.guidance_scale = ns.guidance
    if ns.solver is not None or cfg.log.eval_solver is not None:
        cfg.sampler.solver = ns.solver or cfg.log.eval_solver
    spec = make_sampler_spec(cfg, model.shift, getattr(model, "num_train_timesteps", None), model)
    gen = torch.Generator().manual_seed(ns.seed)
    check_sample_memory(model, len(prompts) * ns.n, f"-n {ns.n} x {len(prompts)} prompts")
    batch = [p for p in prompts for _ in range(ns.n)]
    noise = model.initial_noise(len(batch), gen)
    final, _ = sample(model, model.encode(batch), noise, spec, [], gen, ForwardCounter())
    pages = write_grid(model.decode(final), batch, Path(ns.out), columns=min(ns.n, 8))
    files = [str(f) for p in pages for f in (p.png, p.gif, p.mp4) if f is not None]
    echo(f"wrote {len(batch)} samples to {', '.join(files)}")
    return 0


def _eval(ns) -> int:
    show_phases(not ns.json)  # --json prints the metrics alone
    phase("importing the trainer")
    from flowdppo.evaluate import Evaluator
    from flowdppo.rewards import get_reward
    from flowdppo.runs import load_run
    from flowdppo.trainer.checkpoint import write_text_atomic
    from flowdppo.trainer.guards import bounded
    from flowdppo.trainer.loop import make_sampler_spec, reward_options

    ns.steps = _step_counts(ns.steps)
    _check_sampling_options(ns)
    phase(f"loading {ns.run}")
    cfg, task, model, iteration = load_run(ns.run, raw_weights=ns.raw_weights)
    if ns.solver is not None or cfg.log.eval_solver is not None:
        cfg.sampler.solver = ns.solver or cfg.log.eval_solver
    phase("building the rewards")
    rewards = {
        n: bounded(n, get_reward(n, **reward_options(cfg, n)), cfg.reward.timeout_s)
        for n in (cfg.reward.names or task.default_rewards)
    }
    spec = make_sampler_spec(cfg, model.shift, getattr(model, "num_train_timesteps", None), model)
    ev = Evaluator(
        model,
        rewards,
        spec,
        cfg.log.eval_sde_steps or cfg.sampler.num_sde_steps,
        cfg.log.eval_sde_window or cfg.sampler.sde_window,
        ns.n or cfg.log.eval_samples_per_prompt,
        seed=cfg.train.seed + 1,
        concurrent=cfg.reward.concurrent,
        group_of=task.extra.get("eval_group"),
    )
    if ns.steps:
        from flowdppo.inference_cost import format_table, measure

        rows = measure(cfg, model, ev, task.eval_split(), ns.steps)
        text = json.dumps({"rows": rows}, indent=1)
        # Whole or not at all: a kill mid-write keeps the previous table the report reads.
        write_text_atomic(Path(ns.run) / "inference_cost.json", text)
        echo(format_table(rows, iteration))
        echo(f"wrote {Path(ns.run) / 'inference_cost.json'}")
        if ns.out:
            write_text_atomic(Path(ns.out), text)
        return 0
    train, heldout = task.eval_split()
    phase(
        f"evaluating iteration {iteration}; prompts: {len(train)} trained, {len(heldout)} "
        f"held-out, {ev.n} samples each"
    )
    metrics = ev.run(train, heldout)
    metrics["iteration"] = iteration
    text = json.dumps(metrics, indent=1)
    if ns.json:
        echo(text)
    else:
        # The base model's evaluation, recorded when the run started, when it is comparable
        # (the run's own number of samples per prompt).
        summary = Path(ns.run) / "summary.json"
        same = ns.n is None or ns.n == cfg.log.eval_samples_per_prompt
        before = json.loads(summary.read_text()).get("before", {}) if summary.is_file() else {}
        echo(f"{ns.run} at iteration {iteration} ({ev.n} samples per prompt)")
        _print_before_after(before if same else {}, metrics)
    if ns.out:
        write_text_atomic(Path(ns.out), text)
    return 0


def _export_lora(ns) -> int:
    from flowdppo.config import config_from_dict, read_yaml

    run_dir = Path(ns.run)
    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"error: {run_dir} is not a run directory (no config.yaml)")
    cfg = config_from_dict(read_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml"))
    if cfg.model.kind == "task":
        raise SystemExit(
            f"error: {run_dir} trained task {cfg.task!r}'s built-in model; export-lora takes a "
            "run of a diffusers model (task prompts, model.path set)"
        )
    if cfg.model.finetune != "lora":
        raise SystemExit(
            f"error: {run_dir} fine-tuned the whole transformer (model.finetune full), so it "
            "has no LoRA to export"
        )
    from flowdppo.models.diffusers_adapters import lora_load_hint, save_lora_for_diffusers
    from flowdppo.runs import load_run

    _, _, model, iteration = load_run(run_dir, raw_weights=ns.raw_weights)
    out = save_lora_for_diffusers(model, ns.out)
    echo(
        f"wrote the LoRA of {run_dir} (iteration {iteration}) to {out}; load it with "
        f"{lora_load_hint(model, out)}"
    )
    return 0


def _pretrain(ns) -> int:
    from flowdppo.tasks import get_task

    task = get_task(ns.task)
    pretrain = task.extra.get("pretrain")
    if pretrain is None:
        raise SystemExit(f"error: task {ns.task!r} has no pretraining routine")
    # The installed package's assets are the shipped weights every run of the task loads:
    # they are replaced only when --out names their folder.
    out = Path(ns.out if ns.out is not None else f"pretrained/{ns.task}")
    pretrain(out, ns.seed)
    base = out / f"{ns.task}_base.safetensors"
    use = f"; train on the base model with model.weights={base}" if base.is_file() else ""
    echo(f"wrote task {ns.task!r}'s pretrained weights to {out}/{use}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C where no stop handler runs: while a command starts (imports, a model
        # loading), in eval, sample, report... Training's own loop stops at an iteration
        # boundary with a checkpoint instead (exit 75). Files are replaced whole, so what
        # was written before stays good.
        print("flowdppo: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 128 + 2


def _main(argv: list[str] | None) -> int:
    from flowdppo.verbosity import drop_closed_output, set_verbose

    parser = _parser()
    ns, extra = parser.parse_known_args(argv)
    set_verbose(ns.verbose)
    if extra and ns.command == "compare" and all("=" in x and x[0] != "-" for x in extra):
        ns.overrides += extra  # key=value given after the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handlers = {
        "train": _train,
        "sample": _sample,
        "eval": _eval,
        "pretrain": _pretrain,
        "export-lora": _export_lora,
        "compare": _compare,
        "report": _report,
        "recipes": _recipes,
    }
    try:
        return handlers[ns.command](ns)
    except BrokenPipeError:
        # Output printed outside echo() whose reader went away: no traceback, and the
        # status a shell gives a command ended by SIGPIPE.
        drop_closed_output(sys.stdout)
        return 128 + 13
    except Exception as exc:
        if _user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", 2)
        if not isinstance(exc, OSError):
            raise
        # A file the command writes or reads: its name and the cause.
        from flowdppo.trainer.checkpoint import describe_failure, failure_fix

        place = Path(exc.filename).parent if exc.filename else Path.cwd()
        print(f"error: {describe_failure(exc)} ({failure_fix(exc, place)})", file=sys.stderr)
        return 2
    finally:
        show_phases(False)  # a command's choice, not the process's (main() runs in tests)


def _user_error(exc: Exception) -> bool:
    """A configuration, checkpoint or training error meant for the user (one line).

    Their classes are looked up among the modules already imported: an error of a module
    that was never imported cannot have been raised, and a command that fails early (a bad
    key, --help) never pays for importing the trainer and torch.
    """
    kinds: list[type] = [ValueError]  # ConfigError is one
    for module, name in (
        ("flowdppo.trainer.checkpoint", "CheckpointError"),
        ("flowdppo.trainer.guards", "TrainingError"),
    ):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(exc, tuple(kinds))


def _recipes(ns) -> int:
    from flowdppo.config.recipes import describe, recipe_names

    names = recipe_names()
    width = max(len(n) for n in names)
    for name in names:
        echo(f"{name:<{width}}  {describe(name)}")
    echo(
        "run one with: flowdppo train NAME [key=value ...]; see it: flowdppo train NAME --print-config"
    )
    return 0
