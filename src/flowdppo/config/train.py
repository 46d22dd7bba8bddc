"""The ``train`` section (batch sizes, optimizer, processes, compile) and its ``ema``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from flowdppo.config.base import _Section

#: The objectives that read each train option that not every objective reads (as
#: OBJECTIVE_OPTION_OWNERS): DiffusionNFT replays no recorded step, it draws its own noise
#: levels (nft.timestep_fraction).
TRAIN_OPTION_OWNERS = {"trained_steps": ("dppo", "clip", "guard")}


class EmaConfig(_Section):
    """An exponential moving average of the trained weights (docs/method.md, "EMA")."""

    decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="ema <- decay * ema + (1 - decay) * weights; null: no EMA",
    )
    every: int = Field(1, ge=1, description="optimizer steps between EMA updates")
    evaluate: bool = Field(
        True, description="evaluate the EMA weights during training (false: the raw weights)"
    )


class TrainConfig(_Section):
    iterations: int = Field(200, ge=1)
    prompts_per_iteration: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2, description="samples per prompt (a group needs two)")
    inner_epochs: int = Field(1, ge=1, description="passes over each rollout")
    minibatch_size: int = Field(32, ge=1, description="samples per gradient step")
    grad_accum: int = Field(1, ge=1, description="minibatches per optimizer step")
    micro_batch: int | None = Field(
        None,
        ge=1,
        description="samples per forward and backward in the update (a minibatch is split "
        "into micro-batches whose gradients add up to its own); null: the whole minibatch",
    )
    fuse_steps: bool = Field(
        False,
        description="one forward and backward per minibatch (or micro-batch) over all its "
        "trained steps, their rows batched together, instead of one per step: the same loss "
        "and gradient up to float rounding in fewer, larger network calls; activation "
        "memory grows with the trained steps. Methods with SDE steps only",
    )
    drop_zero_advantage: bool = Field(
        False,
        description="train only on samples whose advantage is not exactly 0 (a group of "
        "equal rewards): the kept samples fill as many minibatches as the whole batch would, "
        "as Flow-GRPO's and GRPO-Guard's trainers do",
    )
    trained_steps: tuple[int, int] | None = Field(
        None,
        description="[first, stop): replay only the recorded SDE steps k with first <= k < "
        "stop (GRPO-Guard's trainer: all 10 steps stochastic, [0, 9) trained); null: every "
        "recorded step",
    )
    max_grad_norm: float | None = Field(1.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_iterations: int = Field(0, ge=0)
    seed: int = Field(0, ge=0, lt=2**63, description="seeds every random draw of the run")
    max_skipped_steps: int = Field(
        3, ge=0, description="non-finite optimizer steps skipped in a row before aborting"
    )
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None,
        description="CPU threads for torch: a count; auto: the cores other processes leave "
        "idle, re-read after every iteration; null: the task's recommendation (digits, "
        "motion: 1; shapes, text: auto). A count or OMP_NUM_THREADS fixes it",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="under torchrun / accelerate launch: ddp (whole model per process) or "
        "fsdp (parameters, gradients and optimizer state sharded over processes)",
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto: nccl if CUDA is available, else gloo"
    )
    # A process may go this long without progress (a model forward, a checkpoint step)
    # while every other one waits too. The longest legitimate stretch on a real model is
    # rank 0 evaluating alone, or writing a full fine-tuning checkpoint, while the others
    # wait: minutes. 15 minutes is a margin of about 3 over that, and frees a hung
    # multi-GPU job in half the time of PyTorch's own default (30 minutes).
    dist_timeout_s: float = Field(
        900.0,
        gt=0,
        description="multi-process runs: a process that makes no progress this long, or whose "
        "launcher or peers are gone, ends the job (docs/RELIABILITY.md)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the network for rollout, reference KL and update (the "
        "module is compiled in place: checkpoints, LoRA export and resume see the same names)",
    )
    compile_backend: str = Field(
        "inductor", description="torch.compile backend (aot_eager: graph capture only)"
    )
    checkpoint_every_minutes: float | None = Field(
        None,
        gt=0,
        description="also checkpoint at the first iteration boundary this many minutes after "
        "the last checkpoint; null: only every log.checkpoint_every iterations",
    )
    ema: EmaConfig = Field(default_factory=EmaConfig)

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v):
        if v is None or v == "auto":
            return v
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"must be a thread count >= 1, auto (the cores other processes leave idle) "
                f"or null (the task's recommendation), got {v!r}"
            )
        return v

    @field_validator("trained_steps")
    @classmethod
    def _trained_steps(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"must be [first, stop) with 0 <= first < stop, got {list(v)}")
        return v

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"both Adam betas must be in [0, 1), got {list(v)}")
        return v
