"""One training loop for every model and algorithm (docs/method.md).

Per iteration: roll out P prompts x G samples with no gradient, score them, form group
advantages, then replay the recorded SDE steps for I inner epochs of minibatches and apply
the objective. Flow-DPPO and the ratio-clipping baselines differ only in the objective
function called in :func:`flowdppo.trainer.update.step_loss`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from flowdppo import plugins, schedule
from flowdppo.config import (
    Config,
    Continuation,
    dump_config,
    read_yaml,
    ref_kl_plan,
    resolve_trust_region,
    reward_weights,
)
from flowdppo.evaluate import Evaluator
from flowdppo.models.finetune import apply_finetuning, trainable_state
from flowdppo.rewards import get_reward, reward_factory
from flowdppo.tasks import task_for_config
from flowdppo.trainer import budget, guards, preemption, watchdog
from flowdppo.trainer import checkpoint as ckpt
from flowdppo.trainer.ema import WeightAverage
from flowdppo.trainer.guards import TrainingError
from flowdppo.trainer.lock import RunLock
from flowdppo.trainer.rollout import (
    ForwardCounter,
    SamplerSpec,
    reference_kl,
    reference_kl_rows,
    rollout,
)
from flowdppo.trainer.runlog import Progress, RunLog, check_wandb, open_run_log, read_metrics
from flowdppo.trainer.sharding import OneProcess
from flowdppo.trainer.threads import governor_for
from flowdppo.trainer.update import (
    ObjectiveSpec,
    OldModel,
    UpdateStats,
    nft_plan,
    nft_term_loss,
    steps_loss,
)
from flowdppo.verbosity import phase

#: Written when a run reaches the end of its budget, and only then (removed when continued).
SUMMARY = "summary.json"
#: Checkpoint tensor names of DiffusionNFT's old model (next to the trainable tensors).
OLD_MODEL_PREFIX = "nft_old_model."


def make_sampler_spec(
    cfg: Config, model_shift: float, num_train_timesteps: int | None, model=None
) -> SamplerSpec:
    s = cfg.sampler
    shift = model_shift if s.shift is None else s.shift
    if s.shift is None and callable(getattr(model, "sigmas", None)):
        # A diffusers model knows its pipeline's exact schedule (dynamic shift included).
        sigmas = model.sigmas(s.num_steps)
    else:
        sigmas = schedule.sigma_schedule(
            s.num_steps, shift, num_train_timesteps=num_train_timesteps
        )
    # A deterministic training sampler (DiffusionNFT's default) still measures its KL to
    # the reference with the Flow-SDE kernel, as every other method does.
    kernel = "flow" if cfg.kernel == "ode" else cfg.kernel
    return SamplerSpec(
        kernel,
        sigmas,
        s.eta,
        s.guidance_scale,
        s.log_prob_reduce,
        s.score,
        s.solver,
        # Sharded weights are not folded (the config's description says so).
        merge_lora=s.merge_lora and cfg.train.distributed != "fsdp",
    )


def reward_options(cfg: Config, name: str) -> dict:
    """``reward.options.NAME``, with ``model.forward_batch_size`` as the batch of a model
    reward that takes a ``batch_size`` and was not given one."""
    options = dict(cfg.reward.options.get(name, {}))
    n = cfg.model.forward_batch_size
    if n is not None and "batch_size" not in options:
        try:
            takes = "batch_size" in inspect.signature(reward_factory(name)).parameters
        except (TypeError, ValueError):  # no signature to read
            takes = False
        if takes:
            options["batch_size"] = n
    return options


def lr_factor(cfg: Config, step: int, total: int) -> float:
    t = cfg.train
    warm = t.warmup_iterations * max(1, total // t.iterations)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if t.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if t.lr_schedule == "linear":
        return 1 - progress
    return 1.0


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.lock = RunLock(self.run_dir)
        # User code first: it may register the task or the rewards named below.
        plugins.load_user_code(cfg.reward)
        try:
            if resume and self.run_dir.is_dir():
                # Before the model loads (minutes for a real one): a second writer is
                # refused at once.
                self._claim_run_dir()
            self._build(resume)
        except BaseException:
            self._release_run_dir()
            raise

    def _build(self, resume: bool) -> None:
        cfg = self.cfg
        self.task = task_for_config(cfg)
        # torch's thread count: fixed, or following the cores left idle (trainer/threads.py).
        self.threads = governor_for(cfg.train.threads, self.task.extra.get("threads"))
        reward_names = cfg.reward.names or self.task.default_rewards
        stray = sorted(set(cfg.reward.options) - set(reward_names))
        if stray:
            raise TrainingError(
                f"reward.options names {stray}, which this run does not use (its rewards: "
                f"{reward_names})"
            )
        timeout = cfg.reward.timeout_s  # a reward that hangs stops the run, naming it
        phase(f"building the reward{'s' * (len(reward_names) > 1)} {', '.join(reward_names)}")
        self.rewards = {
            name: guards.bounded(name, get_reward(name, **reward_options(cfg, name)), timeout)
            for name in reward_names
        }
        unknown = set(cfg.reward.weights) - set(self.rewards)
        if unknown:
            raise TrainingError(
                f"reward.weights names {sorted(unknown)}, which are not in reward.names "
                f"{reward_names}"
            )
        if cfg.log.wandb:
            check_wandb(cfg)  # missing or not logged in: one error line before the model loads
        where = cfg.model.path or cfg.model.weights
        phase(f"loading the {cfg.task} base model" + (f" from {where}" if where else ""))
        self.model = self.task.build_model(cfg.model.weights)
        self.model.forward_batch_size = cfg.model.forward_batch_size
        # Trust regions in both forms (per element and nats per step) for this model's
        # latent size; config.yaml and summary.json record both.
        self.cfg = cfg = resolve_trust_region(cfg, self.model.latent_elements())
        # LoRA initialises its adapters from the global RNG: seed it so that two runs with
        # one seed start identically, even within one process.
        torch.manual_seed(cfg.train.seed)
        targets = cfg.model.lora_targets or self.task.extra.get("lora_targets")
        self.params = apply_finetuning(
            self.model,
            cfg.model.finetune,
            rank=cfg.model.lora_rank,
            alpha=cfg.model.lora_alpha,
            targets=targets,
        )
        self.params = self._shard_model(self.params)
        t = cfg.train
        if t.compile:
            self.model.compile(t.compile_backend)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay
        )
        self.ema = (
            WeightAverage(self.model.module, t.ema.decay, t.ema.every)
            if t.ema.decay is not None
            else None
        )
        self.spec = make_sampler_spec(
            cfg, self.model.shift, getattr(self.model, "num_train_timesteps", None), self.model
        )
        # Only the training rollouts take the coarse deterministic grid and shared prefixes:
        # evaluations, reference KLs and replay keep every level of the schedule.
        self.rollout_spec = dataclasses.replace(self.spec, ode_stride=cfg.sampler.ode_stride)
        self.share_prefix = t.group_size if cfg.sampler.shared_prefix else 1
        o = cfg.objective
        self.objective = ObjectiveSpec(
            cfg.objective_name,
            dppo_threshold=o.dppo_threshold,
            clip_range=o.clip_range,
            dppo_mask=o.dppo_mask,
            clip_range_high=o.clip_range_high,
            beta=o.beta,
            guard_clip_range=o.guard_clip_range,
            kl_convention=o.kl_convention,
        )
        self.old_model = OldModel(self.model.module) if cfg.objective_name == "nft" else None
        self.generator = torch.Generator().manual_seed(t.seed)
        self.counter = ForwardCounter()
        self.sharding = OneProcess(cfg.samples_per_iteration)
        self.evaluator = Evaluator(
            self.model,
            self.rewards,
            dataclasses.replace(self.spec, solver=cfg.log.eval_solver or self.spec.solver),
            cfg.log.eval_sde_steps or cfg.sampler.num_sde_steps,
            cfg.log.eval_sde_window or cfg.sampler.sde_window,
            cfg.log.eval_samples_per_prompt,
            seed=t.seed + 1,
            counter=self.counter,
            concurrent=cfg.reward.concurrent,
            group_of=self.task.extra.get("eval_group"),
        )
        self.iteration = 0
        self.optimizer_steps = 0
        self.skipped_in_a_row = 0  # consecutive optimizer steps skipped for non-finite values
        self.phase_time: dict[str, float] = {}
        self.summary: dict = {}
        budget.check_batch_memory(cfg, self.model, self._processes(), self.task.eval_split())
        if resume:
            self._resume()
        else:
            self._start_run_dir()

    # ---------------------------------------------------------------- run directory
    def _processes(self) -> int:
        return 1

    def _claim_run_dir(self) -> None:
        """Hold the run directory's lock (trainer/lock.py) until the run ends."""
        self.lock.acquire()

    def _release_run_dir(self) -> None:
        self.lock.release()

    def _notice(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def _start_run_dir(self) -> None:
        # As deep and long as the names a run writes (checkpoint files, TensorBoard's event
        # files): a run directory near the path-length limit fails here, not at its end.
        probe = self.run_dir / ".write-probe" / ("p" * 96)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe.parent.mkdir(exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
            probe.parent.rmdir()
        except OSError as exc:
            raise TrainingError(f"run directory {self.run_dir} is not writable: {exc}") from exc
        self.lock.acquire()
        if ckpt.latest_checkpoint(self.run_dir) is not None:
            raise TrainingError(
                f"run directory {self.run_dir} already holds checkpoints; continue it with "
                f"--resume {self.run_dir} or choose another log.run_dir"
            )
        try:
            ckpt.write_text_atomic(self.run_dir / "config.yaml", dump_config(self.cfg))
        except OSError as exc:
            raise TrainingError(
                f"could not write {ckpt.describe_failure(exc)} "
                f"({ckpt.failure_fix(exc, self.run_dir)})"
            ) from exc

    def _resume(self) -> None:
        ckpt.check_layout(self.run_dir, f"cannot resume {self.run_dir}")
        path, warning = ckpt.resolve_latest(self.run_dir)
        if warning:
            self._notice(f"warning: {warning}")
        if path is None:
            raise TrainingError(
                f"nothing to resume in {self.run_dir}: it holds no checkpoint "
                "(start a new run without --resume)"
            )
        phase(f"restoring {path.name}")
        try:
            payload, model_state, optim_state, rng = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as exc:
            good = ckpt.newest_valid_checkpoint(self.run_dir)
            hint = (
                f"the newest checkpoint that verifies is {good.name}: move {path.name} out of "
                f"the run directory and write '{good.name}' into {self.run_dir / ckpt.LATEST}"
                if good is not None and good != path
                else "no other checkpoint in the run directory verifies"
            )
            raise ckpt.CheckpointError(f"cannot resume: {exc}; {hint}") from exc
        current = trainable_state(self.model.module)
        old = {k: model_state.pop(k) for k in list(model_state) if k.startswith(OLD_MODEL_PREFIX)}
        saved = payload["state"].get("config")
        problem = ckpt.mismatch(path, model_state, current, saved, self.cfg.model_dump(mode="json"))
        if problem:
            raise TrainingError(problem)
        self._load_trainable(model_state, optim_state)
        if self.old_model is not None:
            try:
                self.old_model.load({k.removeprefix(OLD_MODEL_PREFIX): v for k, v in old.items()})
            except ValueError as exc:
                raise TrainingError(f"cannot resume {path}: {exc}") from exc
        if self.ema is not None:
            average = ckpt.load_ema(path)
            if average is None:
                raise TrainingError(f"checkpoint {path} holds no EMA, but train.ema is on")
            self.ema.load(average)
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        st = payload["state"]
        self.iteration = payload["iteration"]
        self.optimizer_steps = st["optimizer_steps"]
        self.phase_time = st["phase_time"]
        self.summary = st["summary"]
        self.counter.calls, self.counter.samples = st["forward_calls"], st["forward_samples"]
        self.counter.backward = st["backward_calls"]
        self.skipped_in_a_row = st.get("skipped_in_a_row", 0)
        self._record_continuation(payload["iteration"])

    def _record_continuation(self, iteration: int) -> None:
        """A run continued past its budget (``--resume RUN train.iterations=N``): its
        config.yaml gets the new budget and the continuation's entry in ``history``.

        First, a summary.json that does not describe this run's last iteration (the
        continued run's old one, or one left by a continuation stopped before its end) is
        removed, before config.yaml records the longer budget: a run stopped from now on has
        no summary, so ``[ -f RUN/summary.json ]`` answers "finished" truthfully."""
        summary = self.run_dir / SUMMARY
        if summary.exists() and not self.finished:
            summary.unlink(missing_ok=True)
            ckpt.fsync_dir(self.run_dir)
        path = self.run_dir / "config.yaml"
        own = read_yaml(path).get("train", {}).get("iterations")
        if isinstance(own, int) and own != self.cfg.train.iterations:
            entry = Continuation(
                at_iteration=iteration,
                iterations_before=own,
                iterations_after=self.cfg.train.iterations,
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            self.cfg = self.cfg.model_copy(update={"history": [*self.cfg.history, entry]})
            ckpt.write_text_atomic(path, dump_config(self.cfg))
            t = self.cfg.train
            lr = ""
            if t.lr_schedule != "constant":
                total = t.iterations * self._updates_per_iteration()
                factor = lr_factor(self.cfg, self.optimizer_steps, total)
                lr = (
                    f"; the {t.lr_schedule} lr schedule now spans {t.iterations} iterations, "
                    f"so the lr resumes at {factor:.3g} x train.lr (docs/method.md)"
                )
            self._notice(
                f"flowdppo: continuing {self.run_dir} from iteration {iteration} to "
                f"{t.iterations} (recorded in {path}){lr}"
            )

    def _checkpoint(self) -> None:
        state = {
            "optimizer_steps": self.optimizer_steps,
            "phase_time": self.phase_time,
            "summary": self.summary,
            "forward_calls": self.counter.calls,
            "forward_samples": self.counter.samples,
            "backward_calls": self.counter.backward,
            "skipped_in_a_row": self.skipped_in_a_row,
            # What the checkpoint was written with: a resume names the keys edited since.
            "config": self.cfg.model_dump(mode="json"),
        }
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        model_state, optim_state, old, ema = self._checkpoint_tensors()
        if old is not None:
            model_state = {**model_state, **{OLD_MODEL_PREFIX + k: v for k, v in old.items()}}
        ckpt.save_checkpoint(
            self.run_dir,
            self.iteration,
            model_state,
            optim_state,
            rng,
            state,
            keep=self.cfg.log.keep_checkpoints,
            ema=ema,
        )

    # Hooks that sharded training (FSDP in trainer/distributed.py) overrides.
    def _shard_model(self, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """The trainable parameters the optimizer steps (after any sharding)."""
        return params

    def _load_trainable(self, model_state: dict, optim_state: dict) -> None:
        """Load a checkpoint's full (unsharded) trainable tensors and optimizer state."""
        with torch.no_grad():
            for name, p in self.model.module.named_parameters():
                if name in model_state:
                    p.copy_(model_state[name])
        self.optimizer.load_state_dict(optim_state)

    def _checkpoint_tensors(self) -> tuple[dict, dict, dict | None, dict | None]:
        """Full (unsharded) trainable tensors, optimizer state, DiffusionNFT's old model and
        the EMA (None where off), as a checkpoint holds them."""
        return (
            trainable_state(self.model.module),
            self.optimizer.state_dict(),
            self.old_model.state() if self.old_model is not None else None,
            self.ema.average if self.ema is not None else None,
        )

    @contextmanager
    def _timed(self, phase: str, metrics: dict):
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        metrics[f"time/{phase}"] = metrics.get(f"time/{phase}", 0.0) + elapsed
        self.phase_time[phase] = self.phase_time.get(phase, 0.0) + elapsed

    # ---------------------------------------------------------------- one iteration
    def _draw_prompts(self) -> tuple[list[str], torch.Tensor]:
        t = self.cfg.train
        pool = self.task.train_prompts
        pick = torch.randint(len(pool), (t.prompts_per_iteration,), generator=self.generator)
        prompts = [pool[i] for i in pick.tolist() for _ in range(t.group_size)]
        group = torch.arange(t.prompts_per_iteration).repeat_interleave(t.group_size)
        return prompts, group

    def _score(
        self, images: torch.Tensor, prompts: list[str], times: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rewards and the mask of validly scored samples (see :mod:`guards`); each reward's
        seconds go into ``times``."""
        r = self.cfg.reward
        return guards.score(
            self.rewards,
            images,
            prompts,
            r.max_invalid_fraction,
            concurrent=r.concurrent,
            times=times,
        )

    def _update(self, ro, advantages: torch.Tensor, metrics: dict) -> None:
        """Replay the rollout for the inner epochs of minibatches and step the optimizer.

        The one update loop, for one process and for many: ``self.sharding`` says which
        rows are this process's, routes the update forward, and joins gradients, losses and
        statistics (trainer/sharding.py). ``ro`` holds this process's rows, ``advantages``
        the whole global batch's.
        """
        t = self.cfg.train
        sh = self.sharding
        size = sh.shard.global_size
        local_adv = sh.local(advantages)
        route = sh.route(self.counter)
        stats = UpdateStats()
        total_updates = t.iterations * self._updates_per_iteration()
        plan = None
        # The recorded SDE steps this update replays (train.trained_steps: a range of them).
        span = t.trained_steps or (0, self.spec.num_steps)
        terms = [i for i, k in enumerate(ro.sde_steps) if span[0] <= k < span[1]]
        metrics["update/trained_step_mask"] = sum(1 << ro.sde_steps[i] for i in terms)
        if self.old_model is not None:
            plan = nft_plan(
                size,
                self.spec.num_steps,
                self.cfg.nft.timestep_fraction,
                t.inner_epochs,
                self.generator,
            )
            terms = list(range(plan.terms))  # noise levels per sample, not recorded steps
            metrics["update/trained_step_mask"] = 0
        n_terms = len(terms)
        metrics["update/trained_steps"] = n_terms
        # train.drop_zero_advantage: only samples with a nonzero advantage (the same on every
        # process: the advantages are the global batch's). They fill as many minibatches as
        # the whole batch would, so the optimizer steps per iteration (and the lr and old-
        # model schedules counted in them) do not depend on how many were dropped.
        kept = None
        if t.drop_zero_advantage:
            kept = torch.nonzero(advantages.cpu() != 0).flatten()
        metrics["update/dropped_samples"] = 0 if kept is None else size - len(kept)
        steps_before = self.optimizer_steps
        pending = 0
        pending_loss = torch.zeros(())
        skipped = 0
        unit = 0
        self.optimizer.zero_grad(set_to_none=True)
        for epoch in range(t.inner_epochs):
            if kept is None:
                perm = torch.randperm(size, generator=self.generator)
                batches = list(perm.split(t.minibatch_size))
            else:
                perm = kept[torch.randperm(len(kept), generator=self.generator)]
                count = min(math.ceil(size / t.minibatch_size), len(perm))
                batches = list(perm.tensor_split(count)) if count else []
            for b, idx in enumerate(batches):
                # Our members of the minibatch, split into train.micro_batch passes (padded
                # with empty ones to the count every process makes).
                where = sh.mine(idx)
                passes = sh.passes(idx, t.micro_batch)
                parts = list(where.split(t.micro_batch or len(idx))) if len(where) else []
                parts += [where.new_zeros(0)] * (passes - len(parts))
                # DDP averages over processes: each process's sum, scaled by W, averages
                # to the one-process mean over the minibatch's samples, its trained steps
                # and the accumulated minibatches.
                scale = sh.world_size / (len(idx) * n_terms * t.grad_accum)
                pending += 1
                last = epoch == t.inner_epochs - 1 and b == len(batches) - 1
                sync = pending == t.grad_accum or last
                # train.fuse_steps: every trained step of a pass in one forward and backward.
                chunks = [terms] if t.fuse_steps and plan is None else [[i] for i in terms]
                for c, chunk in enumerate(chunks):
                    noise = None
                    if plan is not None:  # the whole minibatch's, as one process draws it
                        shape = (len(idx), *ro.final.shape[1:])
                        noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
                    for p, part in enumerate(parts):
                        owned = len(part)
                        if not owned:  # a stand-in of ours keeps the passes in lockstep
                            part = where.new_zeros(1)
                        rows = (idx[part] - sh.shard.start).clamp(0, sh.shard.size - 1)
                        final = sync and c == len(chunks) - 1 and p == passes - 1
                        with sh.backward_context(final):
                            if plan is None:
                                calls = steps_loss(
                                    self.model,
                                    ro,
                                    rows,
                                    chunk,
                                    local_adv,
                                    self.spec,
                                    self.objective,
                                    route,
                                )
                            else:
                                calls = [
                                    nft_term_loss(
                                        self.model,
                                        ro,
                                        rows,
                                        plan.steps[epoch, idx[part], chunk[0]],
                                        local_adv,
                                        self.spec,
                                        self.cfg.nft,
                                        self.old_model,
                                        noise[part],
                                        route,
                                    )
                                ]
                            loss = sum(term.sum() for term, _ in calls)
                            if owned:
                                (loss * scale).backward()
                                pending_loss = pending_loss + loss.detach()
                            else:  # exactly zero, even if the stand-in's loss is not finite
                                zero = sum(torch.nan_to_num(term).sum() for term, _ in calls)
                                (zero * 0.0).backward()
                        self.counter.backward += 1
                        for u, (_, call) in enumerate(calls):
                            stats.add(unit + u, owned, call)
                    unit += len(chunk)
                if sync:
                    # Every process takes the same skip decision: it judges the summed loss.
                    norm = self._optimizer_step(total_updates, sh.sum(pending_loss))
                    if norm is None:
                        skipped += 1
                    else:
                        stats.add_step("grad_norm", norm)
                    pending = 0
                    pending_loss = torch.zeros(())
        if self.old_model is not None:
            decay = self.cfg.nft.decay(self.optimizer_steps)
            self.old_model.update(self.model.module, decay)
            metrics["nft/old_decay"] = decay
        metrics.update(stats.result(sh.gather if sh.world_size > 1 else None, n_terms))
        metrics.setdefault("grad_norm", math.nan)  # every step was skipped
        metrics["train/skipped_steps"] = skipped
        metrics["update/optimizer_steps"] = self.optimizer_steps - steps_before
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]

    def _updates_per_iteration(self) -> int:
        t = self.cfg.train
        minibatches = math.ceil(self.cfg.samples_per_iteration / t.minibatch_size)
        return t.inner_epochs * math.ceil(minibatches / t.grad_accum)

    def _optimizer_step(self, total_updates: int, loss_sum: torch.Tensor) -> torch.Tensor | None:
        """Clip and apply the accumulated gradient: its norm (a tensor on the device), or None
        when it was skipped as non-finite."""
        t = self.cfg.train
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # One host read per optimizer step: a skipped step must leave Adam's moments and
        # step count alone, which the host decides before calling the optimizer.
        finite = torch.isfinite(norm) & torch.isfinite(loss_sum.to(norm.device))
        if not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row > t.max_skipped_steps:
                raise TrainingError(
                    f"{self.skipped_in_a_row} optimizer steps in a row had a non-finite loss or "
                    f"gradient (NaN or inf), more than train.max_skipped_steps = "
                    f"{t.max_skipped_steps}; lower train.lr, set train.max_grad_norm, or check "
                    "the model and reward for NaN"
                )
            return None
        self.skipped_in_a_row = 0
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * lr_factor(self.cfg, self.optimizer_steps, total_updates)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.update(self.optimizer_steps)
        return norm.detach()

    # Hooks that multi-process training (trainer/distributed.py) overrides.
    def _rollout(self, prompts: list[str], group: torch.Tensor, sde_steps: list[int]):
        return rollout(
            self.model,
            prompts,
            group,
            self.rollout_spec,
            sde_steps,
            self.generator,
            self.counter,
            share_prefix=self.share_prefix,
        )

    def _reference_kl(self, ro, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[K, samples]: the KL at every recorded step of the samples ``rows`` (None: all)."""
        return reference_kl(self.model, ro, self.spec, self.counter, rows)

    def _open_log(self) -> RunLog:
        return open_run_log(self.cfg, self.run_dir, start_iteration=self.iteration)

    def _open_progress(self) -> Progress:
        return Progress(self.cfg.train.iterations, self.iteration)

    def run_iteration(self) -> dict[str, float]:
        cfg = self.cfg
        metrics: dict[str, float] = {"threads": torch.get_num_threads()}
        start = time.perf_counter()
        watchdog.progress.iteration = self.iteration
        with self._timed("rollout", metrics):
            prompts, group = self._draw_prompts()
            sde_steps = schedule.choose_sde_steps(
                cfg.sampler.num_steps,
                cfg.sampler.num_sde_steps,
                cfg.sampler.sde_window,
                self.generator,
            )
            if cfg.kernel == "ode":  # a deterministic sampler: no exploration step
                sde_steps = []
            before = self.counter.samples.get("rollout", 0)
            with self._rollout_weights(metrics):
                ro = self._rollout(prompts, group, sde_steps)
            # Forwards the rollout spent per sample (with a shared prefix, fewer than steps).
            spent = self.counter.samples.get("rollout", 0) - before
            metrics["rollout/forwards_per_sample"] = spent / ro.batch_size
            # Which steps were stochastic, as a bit mask over the sampler's steps.
            metrics["rollout/sde_steps"] = len(ro.sde_steps)
            metrics["rollout/sde_step_mask"] = sum(1 << k for k in ro.sde_steps)
        with self._timed("reward", metrics):
            watchdog.mark("reward")
            reward_times: dict[str, float] = {}
            rewards, valid = self._score(self.model.decode(ro.final), prompts, reward_times)
            # The weights of the iteration being trained (a warm-up ramps with it); a
            # resumed run recomputes the same ones from the iteration count.
            weights = reward_weights(cfg.reward, self.iteration)
            advantages = guards.valid_advantages(
                rewards,
                group,
                valid,
                weights=weights,
                method=cfg.reward.combine,
                std=cfg.reward.adv_std,
                clip=cfg.reward.adv_clip,
                eps=cfg.reward.adv_eps,
            ).to(ro.final.device)
        every, per_group = ref_kl_plan(cfg)
        if cfg.log.ref_kl and ro.sde_steps and (self.iteration + 1) % every == 0:
            with self._timed("ref_kl", metrics):
                rows = None
                if per_group is not None:
                    seed = cfg.train.seed * 1_000_003 + self.iteration
                    rows = reference_kl_rows(group, per_group, seed)
                kl = self._reference_kl(ro, rows)
            metrics["kl_ref/mean"] = float(kl.mean())
            metrics["kl_ref/path"] = float(kl.sum(0).mean())
            metrics["kl_ref/samples"] = kl.shape[1]
        with self._timed("update", metrics):
            self._update(ro, advantages, metrics)
        total = sum(rewards.values()) if len(rewards) > 1 else next(iter(rewards.values()))
        metrics["reward/mean"] = float(total[valid].mean())
        for name, r in rewards.items():
            metrics[f"reward/{name}/mean"] = float(r[valid].mean())
            metrics[f"reward/{name}/std"] = float(r[valid].std(unbiased=False))
        for name, seconds in reward_times.items():
            metrics[f"time/reward/{name}"] = seconds
        for name, w in weights.items():
            metrics[f"reward/{name}/weight"] = w
        metrics["reward/excluded"] = int((~valid).sum())
        metrics["advantage/abs_mean"] = float(advantages.abs().mean())
        # Terms with a zero advantage (a group of equal rewards) carry no gradient in any
        # objective; grad_blocked_fraction counts them, this says how many there were.
        metrics["advantage/zero_fraction"] = float((advantages == 0).float().mean())
        metrics["time/iteration"] = time.perf_counter() - start
        metrics.update({k: float(v) for k, v in self.counter.as_dict().items()})
        return metrics

    @contextmanager
    def _rollout_weights(self, metrics: dict):
        """The weights that sample this iteration's rollout: DiffusionNFT's old model with
        ``nft.rollout_model: old`` (swapped in on every process), else the policy."""
        if self.old_model is None:
            yield
            return
        old = self.cfg.nft.rollout_model == "old"
        metrics["rollout/old_model"] = int(old)
        with self.old_model.swapped_in(self.model.module) if old else nullcontext():
            yield

    # ---------------------------------------------------------------- the run
    def _evaluated_weights(self):
        """A context holding the weights evaluations measure: the EMA when it is on."""
        if self.ema is not None and self.cfg.train.ema.evaluate:
            return self.ema.applied()
        return nullcontext()

    def _evaluate(self, tag: str, log: RunLog | None, metrics: dict | None) -> dict:
        timed = self._timed("eval", metrics if metrics is not None else {})
        with timed, self._evaluated_weights():
            result = self.evaluator.run(
                *self.task.eval_split(),
                grid_path=self.run_dir / "grids" / f"{tag}.png",
                grid_rewards=self.cfg.log.grid_rewards,
            )
        if log is not None:
            log.grid(self.iteration, self.evaluator.grid_pages)
        if metrics is not None:
            metrics.update(result)
        return result

    @property
    def finished(self) -> bool:
        """Resumed at the end of its budget with a summary of that very iteration: nothing
        left to do. A summary of an earlier iteration (a continued run) does not count."""
        return (
            self.iteration >= self.cfg.train.iterations
            and summary_iteration(self.run_dir) == self.iteration
        )

    def train(self) -> dict:
        """Train to the end of the budget; a finished run returns its summary unchanged."""
        try:
            if self.finished:
                return json.loads((self.run_dir / SUMMARY).read_text())
            self._train()
            return self._write_summary()
        except OSError as exc:  # a grid, TensorBoard, the summary: one account, not a trace
            raise TrainingError(
                f"could not write {ckpt.describe_failure(exc)}. "
                f"{ckpt.failure_fix(exc, self.run_dir)}; {self._surviving_checkpoint()}"
            ) from exc
        finally:
            if self.threads is not None:
                self.threads.close()
            self._release_run_dir()

    def _train(self) -> None:
        cfg = self.cfg
        log = self._open_log()
        progress = self._open_progress()
        self._last_checkpoint = time.monotonic()
        try:
            with preemption.StopSignals(self._surviving_checkpoint) as stop:
                if "before" not in self.summary:
                    train, heldout = self.task.eval_split()
                    phase(
                        f"evaluating the base model; prompts: {len(train)} trained, "
                        f"{len(heldout)} held-out, {self.evaluator.n} samples each"
                    )
                    self.summary["before"] = self._evaluate("iter-000000", log, None)
                if self.iteration < cfg.train.iterations:
                    phase(f"iteration {self.iteration + 1}: the first rollouts and update")
                while self.iteration < cfg.train.iterations:
                    self._iterate(log, progress, stop)
        finally:
            progress.close()
            log.close()

    def _iterate(self, log: RunLog, progress: Progress, stop: preemption.StopSignals) -> None:
        """One iteration, its log line, and at its end the checkpoint or stop it calls for."""
        cfg = self.cfg
        metrics = self.run_iteration()
        if self.threads is not None:
            self.threads.adjust()
        self.iteration += 1
        last = self.iteration == cfg.train.iterations
        every = cfg.log.eval_every
        if last or (every and self.iteration % every == 0):
            self._evaluate(f"iter-{self.iteration:06d}", log, metrics)
        try:
            log.log(self.iteration, metrics)
        except OSError as exc:
            raise TrainingError(
                f"could not append to {exc.filename or log.path} ({exc.strerror or exc}); "
                "the checkpoints and the metrics already written are intact. "
                f"{ckpt.failure_fix(exc, self.run_dir)}, then continue with --resume "
                f"{self.run_dir}"
            ) from exc
        progress.update(self.iteration - 1, cfg.train.iterations, metrics)
        signum, due = self._safe_point(stop)
        if last or signum or due or self.iteration % cfg.log.checkpoint_every == 0:
            if last:
                self.summary["after"] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
            self._checkpoint()
            self._last_checkpoint = time.monotonic()
        if signum and not last:
            raise preemption.Preempted(self._stopped_message(signum))

    # ---------------------------------------------------------------- stopping
    def _safe_point(self, stop: preemption.StopSignals) -> tuple[int, bool]:
        """(a stop signal's number or 0, a checkpoint due by the clock) at an iteration end."""
        minutes = self.cfg.train.checkpoint_every_minutes
        due = minutes is not None and time.monotonic() - self._last_checkpoint >= 60 * minutes
        return self._agree(stop.signum or 0, due)

    def _agree(self, signum: int, due: bool) -> tuple[int, bool]:
        """What every process decides; one process decides alone."""
        return signum, due

    def _resume_command(self) -> str:
        return f"flowdppo train --resume {self.run_dir}"

    def _stopped_message(self, signum: int) -> str:
        name = signal.Signals(signum).name
        return (
            f"stopped by {name} after iteration {self.iteration} of "
            f"{self.cfg.train.iterations}; checkpoint {self.run_dir / ckpt.name_of(self.iteration)} "
            f"is written. Continue with: {self._resume_command()}"
        )

    def _surviving_checkpoint(self) -> str:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return "no checkpoint was written yet"
        return f"the last complete checkpoint, {path}, is intact: {self._resume_command()}"

    def _write_summary(self) -> dict:
        summary = {
            "name": self.cfg.run_name,
            "algorithm": self.cfg.algorithm,
            "iterations": self.iteration,
            "trust_region": trust_region_of(self.cfg),
            "before": self.summary.get("before", {}),
            "after": self.summary.get("after", {}),
            "time_per_phase_s": self.phase_time,
            "counts": self.counter.as_dict(),
            "run_dir": str(self.run_dir),
        }
        ckpt.write_text_atomic(self.run_dir / SUMMARY, json.dumps(summary, indent=1))
        return summary


def summary_iteration(run_dir: str | Path) -> int | None:
    """The iteration ``RUN/summary.json`` describes; None without a readable one."""
    try:
        value = json.loads((Path(run_dir) / SUMMARY).read_text()).get("iterations")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def trust_region_of(cfg: Config) -> dict:
    """The resolved trust-region values, per element and per step, as the summary records them."""
    keys = ("latent_elements", "dppo_threshold", "dppo_threshold_per_step", "clip_range")
    keys += ("clip_range_per_step", "clip_range_high", "clip_range_high_per_step")
    return {k: getattr(cfg.objective, k) for k in keys}


def metrics_of(run_dir: str | Path) -> list[dict]:
    return read_metrics(Path(run_dir) / "metrics.jsonl")
