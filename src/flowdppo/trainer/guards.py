"""What the trainer does with bad numbers: invalid rewards and non-finite gradients.

Rewards (``reward.max_invalid_fraction``): a sample whose reward is NaN or inf under any
reward is excluded from the iteration: it is left out of the group statistics and its
advantage is 0, so it adds nothing to the gradient. The count is logged as
``reward/excluded``. More than the allowed fraction of a batch invalid, a reward that
raises, or one that returns the wrong number of values ends the run with a message naming
the reward.

Gradients (``train.max_skipped_steps``): an optimizer step whose loss or gradient is not
finite is skipped (the gradient is dropped, the weights and Adam moments stay as they
were), counted in ``train/skipped_steps``, and the run ends when more steps than allowed
are skipped in a row.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from flowdppo.advantages import combine_rewards
from flowdppo.rewards import Reward


class TrainingError(RuntimeError):
    """A training run cannot go on; the message says why and what to change."""


#: How long an interrupted reward call is waited for before the interrupt goes on.
INTERRUPTED_WAIT_S = 30.0


class BoundedReward:
    """A reward held to ``reward.timeout_s``: each call runs in a daemon thread, and one that
    has not returned in time is a :class:`TrainingError` naming the reward. A reward that
    never returns (a deadlock, a stalled device, a socket without a timeout) would otherwise
    hang the run until someone kills it. The hung thread is left behind (Python cannot stop
    a thread); being a daemon, it does not keep the process from exiting. Other attributes
    (``annotate``), read or set, are the reward's own."""

    _OWN = ("name", "fn", "timeout_s")

    def __init__(self, name: str, fn: Reward, timeout_s: float) -> None:
        for attr, value in zip(self._OWN, (name, fn, timeout_s)):
            object.__setattr__(self, attr, value)

    def __getattr__(self, attr: str):
        return getattr(self.fn, attr)

    def __setattr__(self, attr: str, value) -> None:
        if attr in self._OWN:
            object.__setattr__(self, attr, value)
        else:
            setattr(self.fn, attr, value)

    def __call__(self, images: torch.Tensor, prompts: list[str]):
        box: dict = {}
        # Thread-local state the caller's thread set: gradient mode and the CUDA device.
        grad = torch.is_grad_enabled()
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

        def run() -> None:
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                with torch.set_grad_enabled(grad):
                    box["value"] = self.fn(images, prompts)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=run, name=f"reward-{self.name}", daemon=True)
        worker.start()
        try:
            worker.join(self.timeout_s)
        except BaseException:
            # Interrupted (Ctrl-C) while the reward computes: let its current call end
            # first, as it would on this thread (the process aborts at exit if torch is
            # still computing in a thread); a second interrupt stops waiting.
            with contextlib.suppress(BaseException):
                worker.join(INTERRUPTED_WAIT_S)
            raise
        if worker.is_alive():
            raise TrainingError(
                f"reward {self.name!r} did not return within reward.timeout_s = "
                f"{self.timeout_s:g} s: it hangs, or is slower than allowed. Fix the reward, "
                "or raise reward.timeout_s (for a run to resume: in its config.yaml); the "
                "checkpoints already written are intact"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]


def bounded(name: str, fn: Reward, timeout_s: float | None) -> Reward:
    """``fn`` held to ``timeout_s`` seconds a call (None: as it is)."""
    return fn if timeout_s is None else BoundedReward(name, fn, timeout_s)


def call_reward(name: str, fn: Reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``fn(images, prompts)`` as a float vector of one value per prompt (may hold NaN).

    A raising reward or one with the wrong number of values is a :class:`TrainingError`
    naming the reward.
    """
    try:
        out = fn(images, prompts)
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
    try:
        r = torch.as_tensor(out).detach().float().reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TrainingError(
            f"reward {name!r} returned {type(out).__name__}, not numbers ({exc}); a reward "
            "returns a tensor of one number per sample"
        ) from exc
    if r.shape[0] != len(prompts):
        shape = tuple(torch.as_tensor(out).shape)
        raise TrainingError(
            f"reward {name!r} returned shape {shape} ({r.shape[0]} values) for "
            f"{len(prompts)} samples; a reward returns one number per sample"
        )
    return r


def call_rewards(
    rewards: dict[str, Reward],
    images: torch.Tensor,
    prompts: list[str],
    *,
    concurrent: bool = True,
    times: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`call_reward` for every reward, in the order of ``rewards``.

    With ``concurrent`` each reward runs in its own thread, so a remote judge waiting on its
    server does not queue behind a local model (torch and onnxruntime release the GIL while
    they compute, HTTP while it waits). Each reward's wall time lands in ``times``. When
    several rewards fail, the first one in order is reported, as it is one after another.
    """
    times = {} if times is None else times

    def timed(name: str, fn: Reward) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return call_reward(name, fn, images, prompts)
        finally:
            times[name] = time.perf_counter() - start

    if not concurrent or len(rewards) < 2:
        return {name: timed(name, fn) for name, fn in rewards.items()}
    with ThreadPoolExecutor(len(rewards), thread_name_prefix="reward") as pool:
        futures = {name: pool.submit(timed, name, fn) for name, fn in rewards.items()}
        return {name: f.result() for name, f in futures.items()}


def score(
    rewards: dict[str, Reward],
    images: torch.Tensor,
    prompts: list[str],
    max_invalid_fraction: float,
    *,
    concurrent: bool = True,
    times: dict[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every reward's values and the mask of samples all rewards scored finitely.

    Raises :class:`TrainingError` when more than ``max_invalid_fraction`` of the batch is
    invalid.
    """
    out = call_rewards(rewards, images, prompts, concurrent=concurrent, times=times)
    valid = torch.ones(len(prompts), dtype=torch.bool)
    for r in out.values():
        valid &= torch.isfinite(r)
    invalid = len(prompts) - int(valid.sum())
    if invalid > max_invalid_fraction * len(prompts):
        per = ", ".join(f"{name!r}: {int((~torch.isfinite(r)).sum())}" for name, r in out.items())
        raise TrainingError(
            f"{invalid} of {len(prompts)} samples have a NaN or infinite reward ({per}), more "
            f"than reward.max_invalid_fraction = {max_invalid_fraction:g} allows; fix the "
            "reward function or raise reward.max_invalid_fraction"
        )
    return out, valid


def valid_advantages(
    rewards: dict[str, torch.Tensor], group: torch.Tensor, valid: torch.Tensor, **kwargs
) -> torch.Tensor:
    """:func:`combine_rewards` over the valid samples only; 0 for the excluded ones."""
    adv = torch.zeros(group.shape[0])
    adv[valid] = combine_rewards(
        {name: r[valid] for name, r in rewards.items()}, group[valid], **kwargs
    )
    return adv
