"""Multi-process training through torch.distributed (``torchrun``, ``accelerate launch``).

Every process holds the whole model (DDP) or its shard of it (``train.distributed=fsdp``,
see :mod:`flowdppo.trainer.fsdp`) and the same shared generator, so all of them draw the
same prompts, SDE steps and minibatch permutations. Process ``r`` of ``W`` owns the
contiguous rows ``[r*B/W, (r+1)*B/W)`` of the global batch of ``B`` samples; it draws the
noise of the whole global batch and keeps its rows (:class:`~flowdppo.trainer.rollout.Shard`),
so sample ``j`` gets the same noise whatever ``W`` is. Rewards and reference KLs are
all-gathered, so advantages (group mean, group or global std) are computed over the whole
global batch on every process, even when a group spans processes.

The update walks the same global minibatches as a one-process run. Each process replays
the members of a minibatch that it owns and weights its loss so that DDP's gradient
average equals the one-process minibatch mean. A process that owns no member of a
minibatch replays one of its samples with weight zero: DDP and FSDP need every process to
run the same number of forward/backward passes. Only rank 0 writes logs, grids, checkpoints and
the summary; every process resumes from the checkpoint rank 0 wrote.
"""

from __future__ import annotations

import atexit
import gc
import os
import socket
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flowdppo.config import Config
from flowdppo.trainer import guards, watchdog
from flowdppo.trainer.faults import fault_point
from flowdppo.trainer.loop import Trainer, TrainingError
from flowdppo.trainer.rollout import ForwardCounter, Shard, reference_kl, rollout
from flowdppo.trainer.sharding import OneProcess

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _communication_error(exc: RuntimeError) -> bool:
    # A backend error reaches Python as DistError from a collective, but as a plain
    # RuntimeError from DDP's reducer inside backward(); both name their backend's source.
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        mark in text for mark in ("gloo", "nccl", "processgroup", "c10d")
    )


class PeerLost(TrainingError):
    """A collective failed: another process of the job died or its machine went away."""

    exit_code = watchdog.EXIT_LOST


def init_distributed(backend: str = "auto", progress_timeout_s: float = 900.0) -> None:
    """Join the process group the launcher set up (idempotent).

    The watchdog ends a job that makes no progress for ``progress_timeout_s``
    (``train.dist_timeout_s``) with a message naming the process; the process group's own
    timeout, which would end it with a bare backend error, is twice that, a backstop for
    when the watchdog cannot run.
    """
    if dist.is_initialized():
        return
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing:
        raise TrainingError(
            f"multi-process training needs the launcher's environment, but {missing} are "
            "unset: start with `torchrun --nproc_per_node=N -m flowdppo train ...` or "
            "`accelerate launch -m flowdppo train ...`"
        )
    if backend == "nccl" and not torch.cuda.is_available():
        raise TrainingError(
            "train.dist_backend=nccl needs CUDA, which this machine lacks: use gloo or auto"
        )
    if backend == "nccl" or (backend == "auto" and torch.cuda.is_available()):
        # Pin each process to its own GPU before any model is built ("cuda" then means it).
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # CUDA tensors go through NCCL, CPU tensors (a model kept on the CPU, small
        # bookkeeping) through gloo.
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=2 * progress_timeout_s))
    # Tear the group down before interpreter shutdown even when training fails: gloo's
    # worker threads can otherwise abort the process at exit.
    atexit.register(_destroy)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed() -> None:
    if dist.is_initialized():
        # Leave together: a process that tears its group down while another still talks to
        # it can abort at exit.
        dist.barrier()
        dist.destroy_process_group()


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every process (e.g. a run directory named after the clock)."""
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Velocity(nn.Module):
    """The model's velocity as a module DDP can wrap.

    Registering ``model.module`` as a child gives DDP the parameters to average; calling
    ``model.velocity`` keeps the adapter's own input handling (guidance, dtypes, devices).
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.net = model.module
        self._model = [model]  # a list, so the adapter is not registered as a child

    def forward(self, x, sigma, cond, guidance_scale):
        return self._model[0].velocity(x, sigma, cond, guidance_scale)


class _Route:
    """A :class:`ForwardCounter` view that sends the policy's update forward through DDP."""

    def __init__(self, counter: ForwardCounter, wrapped: nn.Module) -> None:
        self.counter = counter
        self.wrapped = wrapped

    def velocity(self, model, phase, x, sigma, cond, guidance_scale):
        if phase != "update":
            return self.counter.velocity(model, phase, x, sigma, cond, guidance_scale)
        self.counter.calls[phase] = self.counter.calls.get(phase, 0) + 1
        self.counter.samples[phase] = self.counter.samples.get(phase, 0) + x.shape[0]
        watchdog.mark(phase)
        fault_point(phase)
        return self.wrapped(x, sigma, cond, guidance_scale)


class _Null:
    """Stands in for the run log and the progress bar on ranks other than 0."""

    def log(self, *args, **kwargs) -> None:
        pass

    def grid(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class ProcessGroup(OneProcess):
    """The sharding strategy of one process of a ``torchrun`` job (trainer/sharding.py)."""

    def __init__(self, shard: Shard, rank: int, world_size: int, wrapped, fsdp: bool) -> None:
        self.shard, self.rank, self.world_size = shard, rank, world_size
        self.wrapped, self.fsdp = wrapped, fsdp

    def backward_context(self, sync: bool):
        # FSDP reduce-scatters every backward (its gradients stay sharded); DDP all-reduces
        # only in the backward an optimizer step follows.
        return nullcontext() if sync or self.fsdp else self.wrapped.no_sync()

    def route(self, counter: ForwardCounter):
        return _Route(counter, self.wrapped)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().double().cpu()
        dist.all_reduce(t)
        return t

    def gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=dim)


def check_world_size(cfg: Config, world_size: int) -> None:
    """Reject a run that cannot be split over ``world_size`` processes, before any work."""
    n = cfg.samples_per_iteration
    if n % world_size:
        raise TrainingError(
            f"the global batch of train.prompts_per_iteration x train.group_size = "
            f"{cfg.train.prompts_per_iteration} x {cfg.train.group_size} = {n} samples "
            f"cannot be split evenly over {world_size} processes: make it a multiple of "
            f"{world_size}"
        )
    g = cfg.train.group_size
    if cfg.sampler.shared_prefix and (n // world_size) % g:
        # Whole groups per process: each computes its own groups' prefixes, and every
        # process makes forwards of one size (an FSDP forward is a collective).
        raise TrainingError(
            f"sampler.shared_prefix needs whole groups on every process: the "
            f"{n // world_size} samples of each of {world_size} processes are not a multiple "
            f"of train.group_size = {g}; make train.prompts_per_iteration "
            f"({cfg.train.prompts_per_iteration}) a multiple of {world_size}"
        )


class DistributedTrainer(Trainer):
    """:class:`Trainer` for one process of a ``torchrun`` / ``accelerate launch`` job."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False):
        init_distributed(cfg.train.dist_backend, cfg.train.dist_timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()
        check_world_size(cfg, self.world_size)
        n, w = cfg.samples_per_iteration, self.world_size
        self.shard = Shard(self.rank * n // w, n // w, n)
        self.fsdp = cfg.train.distributed == "fsdp"
        self._gathered: tuple | None = None
        super().__init__(cfg, run_dir, resume=resume)
        if self.fsdp:
            # The network is already sharded (_shard_model): its own forward gathers.
            self.wrapped = _Velocity(self.model)
        else:
            # DDP broadcasts rank 0's parameters at construction, so every process starts
            # equal.
            self.wrapped = DistributedDataParallel(
                _Velocity(self.model), forward_sync_buffers=False
            )
        self.sharding = ProcessGroup(
            self.shard, self.rank, self.world_size, self.wrapped, self.fsdp
        )

    def train(self) -> dict:
        peers: list = [None] * self.world_size
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
        guard = watchdog.Watchdog(
            self.rank, peers, self.cfg.train.dist_timeout_s, self._surviving_checkpoint
        )
        guard.start()
        try:
            return super().train()
        except RuntimeError as exc:
            if not _communication_error(exc):
                raise
            raise self._lost(exc) from None
        finally:
            guard.stop()
            # DDP's reducer holds the process group; release it before the group is torn
            # down, or gloo's threads can outlive it and abort the process at exit.
            self.wrapped = None
            gc.collect()

    def _lost(self, exc: Exception) -> PeerLost:
        if not watchdog.claim_exit():
            # The watchdog saw it first and is ending this process with its own account.
            while True:
                time.sleep(1)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        p = watchdog.progress
        return PeerLost(
            f"rank {self.rank} lost contact with the other processes in phase {p.phase!r} "
            f"of iteration {p.iteration + 1} ({first}): a process of the job died or its "
            f"machine went away; {self._surviving_checkpoint()}"
        )

    # ---------------------------------------------------------------- rank-0 side effects
    def _on_rank0(self, fn, *args):
        """Run ``fn`` on rank 0 only; raise its error on every process, not just rank 0."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn(*args)
            except Exception as exc:  # re-raised below, after every process knows
                error = exc
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            raise TrainingError(f"rank 0 failed: {box[0]}")
        return result

    def _on_every_rank(self, fn, *args):
        """Run ``fn`` on every process; raise any process's error on every process."""
        result, error = None, None
        try:
            result = fn(*args)
        except Exception as exc:  # re-raised below, after every process knows
            error = exc
        errors = [None] * self.world_size
        dist.all_gather_object(
            errors, None if error is None else f"{type(error).__name__}: {error}"
        )
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            raise TrainingError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        return result

    # ---------------------------------------------------------------- FSDP
    def _shard_model(self, params):
        if not self.fsdp:
            return params
        from flowdppo.trainer import fsdp

        return fsdp.shard_model(self.model)

    def _load_trainable(self, model_state: dict, optim_state: dict) -> None:
        if not self.fsdp:
            return super()._load_trainable(model_state, optim_state)
        from flowdppo.trainer import fsdp

        fsdp.load_full_state(self.model.module, self.optimizer, model_state, optim_state)

    def _checkpoint_tensors(self) -> tuple[dict, dict, dict | None, dict | None]:
        if self._gathered is not None:
            return self._gathered
        return super()._checkpoint_tensors()

    def _start_run_dir(self) -> None:
        super_start = super()._start_run_dir
        self._on_rank0(super_start)

    def _record_continuation(self, iteration: int) -> None:
        super_record = super()._record_continuation
        self._on_rank0(super_record, iteration)

    def _claim_run_dir(self) -> None:
        super_claim = super()._claim_run_dir
        self._on_rank0(super_claim)  # the lock is rank 0's, as are all the writes

    def _processes(self) -> int:
        return self.world_size

    def _notice(self, line: str) -> None:
        if self.rank == 0:
            super()._notice(line)

    def _agree(self, signum: int, due: bool) -> tuple[int, bool]:
        # A signal to any process stops every one at this same iteration; rank 0's clock
        # alone decides a time-based checkpoint, so the processes cannot disagree on it.
        votes = torch.tensor([signum, int(due and self.rank == 0)], dtype=torch.int64)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return int(votes[0]), bool(votes[1])

    def _resume_command(self) -> str:
        return f"the same launcher with `-m flowdppo train --resume {self.run_dir}`"

    def _checkpoint(self) -> None:
        super_checkpoint = super()._checkpoint
        if self.fsdp:  # gathering the full state is a collective: every process takes part
            from flowdppo.trainer import fsdp

            model_state, optim_state = fsdp.full_state(self.model.module, self.optimizer)
            old = fsdp.full_tensors(self.old_model.state()) if self.old_model else None
            ema = fsdp.full_tensors(self.ema.average) if self.ema is not None else None
            self._gathered = (model_state, optim_state, old, ema)
        try:
            self._on_rank0(super_checkpoint)
        finally:
            self._gathered = None

    def _evaluate(self, tag, log, metrics):
        if self.fsdp:
            # Every forward of a sharded model is a collective, so every process runs the
            # whole evaluation (same prompts, same seed); only rank 0 writes the grid.
            return self._on_every_rank(self._evaluate_fsdp, tag, log, metrics)
        super_evaluate = super()._evaluate
        result = self._on_rank0(super_evaluate, tag, log, metrics)
        return result if result is not None else {}

    def _evaluate_fsdp(self, tag, log, metrics):
        grid = self.run_dir / "grids" / f"{tag}.png" if self.rank == 0 else None
        timed = self._timed("eval", metrics if metrics is not None else {})
        with timed, self._evaluated_weights():
            result = self.evaluator.run(
                *self.task.eval_split(), grid_path=grid, grid_rewards=self.cfg.log.grid_rewards
            )
        if log is not None:
            log.grid(self.iteration, self.evaluator.grid_pages)
        if metrics is not None:
            metrics.update(result)
        return result

    def _write_summary(self) -> dict:
        super_write = super()._write_summary
        return self._on_rank0(super_write) or {}

    def _open_log(self):
        return super()._open_log() if self.rank == 0 else _Null()

    def _open_progress(self):
        return super()._open_progress() if self.rank == 0 else _Null()

    # ---------------------------------------------------------------- sharded iteration
    def _local(self, items):
        return items[self.shard.start : self.shard.start + self.shard.size]

    def _gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return self.sharding.gather(t, dim)

    def _rollout(self, prompts, group, sde_steps):
        return rollout(
            self.model,
            self._local(prompts),
            self._local(group),
            self.rollout_spec,
            sde_steps,
            self.generator,
            self.counter,
            shard=self.shard,
            share_prefix=self.share_prefix,
        )

    def _score(self, images: torch.Tensor, prompts: list[str], times: dict[str, float]):
        local = self._local(prompts)
        # Rewards run concurrently on this process's shard; the all-gathers stay on this
        # thread, in one order, so every process issues the same collectives.
        computed = guards.call_rewards(
            self.rewards, images, local, concurrent=self.cfg.reward.concurrent, times=times
        )
        scored = {name: self._gather(r) for name, r in computed.items()}
        # The validity checks of the one-process trainer, applied to the gathered batch,
        # so that every process reaches the same verdict.
        as_rewards = {name: (lambda _i, _p, r=r: r) for name, r in scored.items()}
        return guards.score(as_rewards, images, prompts, self.cfg.reward.max_invalid_fraction)

    def _reference_kl(self, ro, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return self._gather(reference_kl(self.model, ro, self.spec, self.counter), dim=1)
        # Every process measures its own drawn rows, padded with stand-ins to the largest
        # count so that all of them run the same forwards (FSDP gathers in each one).
        size = self.shard.size
        owners = rows // size
        counts = [int((owners == p).sum()) for p in range(self.world_size)]
        width = max(counts)
        mine = rows[owners == self.rank] - self.shard.start
        local = torch.cat([mine, mine.new_zeros(width - len(mine))])
        kl = self._gather(reference_kl(self.model, ro, self.spec, self.counter, local), dim=1)
        keep = [p * width + j for p in range(self.world_size) for j in range(counts[p])]
        return kl[:, keep]

    def run_iteration(self) -> dict[str, float]:
        metrics = super().run_iteration()
        metrics["dist/world_size"] = float(self.world_size)
        return metrics
