"""Which rows of the global batch a process owns, and how its work joins the others'.

The update loop (:meth:`flowdppo.trainer.loop.Trainer._update`) is the same for one
process and for ``W`` processes under ``torchrun``; the difference is this strategy:

* :class:`OneProcess` owns every row; nothing is reduced, gathered or routed.
* :class:`~flowdppo.trainer.distributed.ProcessGroup` owns the contiguous
  rows ``[r*B/W, (r+1)*B/W)``. It sends the update forward through DDP (or the sharded
  network under FSDP), lets a backward synchronise gradients only where an optimizer step
  follows, sums losses and gathers statistics over the processes.

Every process walks the same global minibatches. A process scores the members it owns,
split into micro-batches; all processes make the same number of passes per minibatch
(:meth:`OneProcess.passes`): DDP's synchronising backward and every FSDP forward are
collectives. A process with fewer members fills its passes with zero-weight stand-ins.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from flowdppo.trainer.rollout import ForwardCounter, Shard


class OneProcess:
    """The strategy of a one-process run: every row is ours."""

    rank = 0
    world_size = 1

    def __init__(self, global_size: int) -> None:
        self.shard = Shard(0, global_size, global_size)

    def local(self, items):
        """Our rows of a per-sample sequence or tensor of the global batch."""
        return items[self.shard.start : self.shard.start + self.shard.size]

    def owned_counts(self, idx: torch.Tensor) -> list[int]:
        """How many members of the global minibatch ``idx`` each process owns."""
        size = self.shard.size
        return [
            int(((idx >= p * size) & (idx < (p + 1) * size)).sum()) for p in range(self.world_size)
        ]

    def mine(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions in ``idx`` of the members we own."""
        lo, hi = self.shard.start, self.shard.start + self.shard.size
        return torch.nonzero((idx >= lo) & (idx < hi)).flatten()

    def passes(self, idx: torch.Tensor, micro_batch: int | None) -> int:
        """Forward/backward passes per trained step of the minibatch, the same on every
        process: the most any process needs for its members (at least one)."""
        size = micro_batch or len(idx)
        return max(1, max(math.ceil(c / size) for c in self.owned_counts(idx)))

    def backward_context(self, sync: bool):
        """The context of one backward; ``sync``: an optimizer step follows it."""
        return nullcontext()

    def route(self, counter: ForwardCounter):
        """What the objective calls for its forwards (the counter, or a view that sends the
        update forward through the process group's wrapper)."""
        return counter

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes."""
        return t

    def gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every process's ``t``, concatenated along ``dim`` in rank order."""
        return t


def is_sharded(t: torch.Tensor) -> bool:
    """A tensor FSDP sharded (a ``DTensor``). Only a process group can have made one, so a
    one-process run never imports ``torch.distributed.tensor`` (seconds at start-up)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def copy_full(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the full tensor ``src`` into ``dst``; a sharded ``dst`` keeps its own part."""
    if is_sharded(dst) and not is_sharded(src):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(
            src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None
        )
    dst.copy_(src)
