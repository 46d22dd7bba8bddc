"""Run configuration: YAML files plus ``key=value`` overrides, validated into typed objects.

Every value is checked before any work starts. An unknown key, a wrong type or an
impossible combination is a :class:`ConfigError` whose message names the key and says what
would be valid. The defaults are the built-in Flow-DPPO run on the digits task.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

OBJECTIVES = {
    "dppo": "dppo",
    "grpo": "clip",
    "clip": "clip",
    "cps": "clip",
    "dance": "clip",
    "guard": "guard",
    "nft": "nft",
}
KERNEL_OF_PRESET = {
    "dppo": "flow",
    "grpo": "flow",
    "clip": "flow",
    "cps": "cps",
    "dance": "dance",
    "guard": "flow",
    # DiffusionNFT's public recipe samples deterministically (config/nft.py of NVlabs/
    # DiffusionNFT: sample.deterministic = True); nft+flow explores with Flow-SDE steps.
    "nft": "ode",
}
KERNELS = ("flow", "cps", "dance")
#: The six methods of the paper's comparison table.
PAPER_ALGORITHMS = ("dppo", "grpo", "cps", "guard", "nft", "dppo+cps")


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user."""


def _expand_user(value: str | None) -> str | None:
    """``~`` or ``~user`` at the start of a path key, expanded as ``model.path`` always was
    (a shell leaves ``log.run_dir=~/runs/x`` alone: the tilde is not at a word's start)."""
    if value is None or not value.startswith("~"):
        return value
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        user = value[1:].split("/", 1)[0]
        why = f"there is no user {user!r}" if user else "no home directory is known (HOME unset)"
        raise ValueError(f"cannot expand {value!r}: {why}")
    return expanded


#: A config key that names a file or directory.
PathKey = Annotated[str | None, AfterValidator(_expand_user)]


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number is never a meaningful setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SamplerConfig(_Section):
    num_steps: int = Field(10, ge=1, description="denoising steps per sample")
    eta: float = Field(0.7, ge=0, description="noise level of the SDE kernel")
    num_sde_steps: int = Field(3, ge=1, description="exploration (SDE) steps per trajectory")
    sde_window: tuple[float, float] = Field(
        (0.0, 0.5), description="fraction window of the schedule the SDE steps are drawn from"
    )
    shift: float | None = Field(None, gt=0, description="time shift; null: the model's own")
    guidance_scale: float = Field(1.0, ge=1.0, description="classifier-free guidance (1: off)")
    guidance_scale_2: float | None = Field(
        None,
        ge=1.0,
        description="two-expert Wan 2.2: the low-noise expert's guidance; null: guidance_scale",
    )
    log_prob_reduce: Literal["mean", "sum"] = "mean"
    score: Literal["gaussian", "cps"] = Field(
        "gaussian", description="cps: the CPS authors' unnormalised -(x' - mean)^2 score"
    )

    @field_validator("sde_window")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"must satisfy 0 <= lo < hi <= 1, got [{lo}, {hi}]")
        return v


class ObjectiveConfig(_Section):
    # A trust region is given in one of two forms (docs/method.md, "Units"): per element of
    # the log-prob reduction in use (the published form; with element-mean log-probs its
    # meaning in nats scales with the latent size d), or per SDE step, in nats summed over
    # the latent, which carries from one model and resolution to another. Unset, the run
    # uses the per-step defaults of TRUST_REGION_KEYS: the paper's SD3.5-M settings
    # (delta = 1e-7 and epsilon = 1e-4 per element at d = 65,536) held in nats per step.
    dppo_threshold: float | None = Field(
        None, gt=0, description="Flow-DPPO trust-region KL per element of log_prob_reduce"
    )
    dppo_threshold_per_step: float | None = Field(
        None, gt=0, description="the same threshold in nats per SDE step (d x the per-element)"
    )
    dppo_mask: Literal["asymmetric", "kl", "first_order"] = "asymmetric"
    clip_range: float | None = Field(
        None, gt=0, description="ratio clip for grpo/cps, per element of log_prob_reduce"
    )
    clip_range_per_step: float | None = Field(
        None, gt=0, description="the same clip range as a log-ratio window in nats per step"
    )
    clip_range_high: float | None = Field(None, gt=0)
    clip_range_high_per_step: float | None = Field(None, gt=0)
    latent_elements: int | None = Field(
        None,
        ge=1,
        description="latent elements per sample (d) that relate the two forms; the run "
        "fills it in from the model and checks it on resume",
    )
    beta: float = Field(0.0, ge=0, description="weight of the exact KL to the reference model")
    # GRPO-Guard's clip range on its normalised log-ratio std * (log r + D) (element-mean,
    # docs/method.md). 2e-6 is the clip ratio of the public GRPO-Guard recipe in verl-omni
    # (docs/algo/grpo_guard.md: diffusion_loss.clip_ratio=2e-6); the paper's own code is
    # not released.
    guard_clip_range: float = Field(
        2e-6, gt=0, description="guard: clip range of the normalised ratio (element mean)"
    )
    kl_convention: Literal["exact", "official"] = Field(
        "exact",
        description="exact: the exact per-step KL; official: the official Flow-DPPO code's "
        "(sigma clamped at 0.99 in its std, bf16 old means, the Flow-SDE std with any kernel)",
    )


class NftConfig(_Section):
    """DiffusionNFT's knobs, at the values of its public SD3.5-M recipe (NVlabs/DiffusionNFT,
    config/base.py and config/nft.py; scripts/train_nft_sd3.py for the update rule)."""

    # config/nft.py: config.beta = 1.0 (the GenEval and PickScore recipes; 0.1 for OCR).
    beta: float = Field(1.0, gt=0, description="mixing coefficient of the implicit policies")
    # config/base.py: train.adv_clip_max = 5; the weight is clip(A, -5, 5) / 10 + 1/2.
    adv_clip: float = Field(
        5.0, gt=0, description="advantages clipped to +-adv_clip, then mapped onto [0, 1]"
    )
    # config/base.py: train.timestep_fraction = 0.99: int(0.99 N) of the sampler's N noise
    # levels, drawn per sample and inner epoch.
    timestep_fraction: float = Field(
        0.99, gt=0, le=1, description="fraction of the sampler's noise levels trained on"
    )
    # scripts/train_nft_sd3.py, return_decay with config.decay_type = 1 (GenEval, PickScore):
    # after every iteration old <- d * old + (1 - d) * new, d = min(rate * (step - start),
    # max) from optimizer step `start` on (0 before).
    decay_start: int = Field(0, ge=0, description="optimizer steps before the old model lags")
    decay_rate: float = Field(0.001, ge=0, description="old-model decay gained per optimizer step")
    decay_max: float = Field(0.5, ge=0, lt=1, description="largest old-model decay")
    # config/base.py: train.beta = 0.0001, on mean((v - v_ref)^2).
    ref_beta: float = Field(
        1e-4, ge=0, description="weight of the velocity distance to the reference model"
    )
    # scripts/train_nft_sd3.py: the adaptive weight's floor, clip(min=0.00001).
    adaptive_floor: float = Field(1e-5, gt=0, description="floor of the adaptive x0 weight")
    # scripts/train_nft_sd3.py: policy_loss = (...) * config.train.adv_clip_max.
    loss_scale: float = Field(5.0, gt=0, description="constant factor on the policy loss")

    def decay(self, optimizer_steps: int) -> float:
        """The old model's decay after ``optimizer_steps`` optimizer steps."""
        if optimizer_steps < self.decay_start:
            return 0.0
        return min(self.decay_rate * (optimizer_steps - self.decay_start), self.decay_max)


# The objectives that read each objective option; any other objective refuses it (set to
# a value other than its default). The Flow-DPPO and ratio-clipping trust regions are
# resolved and recorded for both of those objectives, so one experiment config drives both.
_TRUST = ("dppo", "clip")
OBJECTIVE_OPTION_OWNERS = {
    "dppo_threshold": _TRUST,
    "dppo_threshold_per_step": _TRUST,
    "dppo_mask": ("dppo",),
    "clip_range": _TRUST,
    "clip_range_per_step": _TRUST,
    "clip_range_high": _TRUST,
    "clip_range_high_per_step": _TRUST,
    "latent_elements": _TRUST,
    "beta": ("dppo", "clip", "guard"),
    "guard_clip_range": ("guard",),
    "kl_convention": ("dppo", "clip", "guard"),
}


# Flow-GRPO's published CPS recipe (config/grpo.py, the SD3.5-M CPS configs): noise level
# 0.8, the unnormalised score -(x' - mean)^2 and clip range 1e-5 on it, at 512 px
# (d = 65,536): the defaults of ratio clipping with the CPS kernel, the clip range held in
# "nats" per step like every trust region (docs/method.md, "Conventions" and "Units").
CPS_RECIPE = {"eta": 0.8, "score": "cps"}
CPS_CLIP_RANGE_PER_STEP = 65536 * 1e-5
# The paper's Flow-DPPO threshold with the CPS kernel, delta = 1e-6 for SD3.5-M at 512 px
# (configs/sd3/dppo_cps.yaml), held in nats per step: the default of dppo+cps.
DPPO_CPS_THRESHOLD_PER_STEP = 65536 * 1e-6


def drop_foreign_options(tree: dict) -> dict:
    """``tree`` without the objective options its algorithm does not read (an experiment's
    shared settings hold every method's knobs; each run keeps its own)."""
    objective = parse_algorithm(str(tree.get("algorithm", "dppo")))[0]
    section = tree.get("objective")
    out = dict(tree)
    if isinstance(section, dict):
        out["objective"] = {
            k: v
            for k, v in section.items()
            if k not in OBJECTIVE_OPTION_OWNERS or objective in OBJECTIVE_OPTION_OWNERS[k]
        }
    if objective != "nft":
        out.pop("nft", None)
    return out


# Trust-region keys whose value has a per-element and a per-step form, with the per-step
# default (None: no default, the key stays unset).
TRUST_REGION_KEYS = {
    "dppo_threshold": 65536 * 1e-7,
    "clip_range": 65536 * 1e-4,
    "clip_range_high": None,
}


class WeightSchedule(_Section):
    """A reward's weight that ramps linearly from ``start`` to ``value`` over the first
    ``warmup_iterations`` iterations, then stays at ``value``."""

    value: float = Field(description="the weight after the warm-up")
    warmup_iterations: int = Field(ge=1, description="iterations the ramp lasts")
    start: float = Field(0.0, description="the weight at iteration 0")

    def at(self, iteration: int) -> float:
        frac = min(1.0, iteration / self.warmup_iterations)
        return self.start + (self.value - self.start) * frac


class RewardConfig(_Section):
    names: list[str] = Field(
        default_factory=list,
        description="registered names or package.module:function import paths of reward "
        "factories; empty: the task's default",
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="modules imported before the run starts (they register rewards, tasks or "
        "model adapters); recorded, so resume, eval and sample import them too",
    )
    weights: dict[str, float | WeightSchedule] = Field(
        default_factory=dict,
        description="per reward: a constant weight, or {value, warmup_iterations, start} for "
        "a linear warm-up; unnamed rewards weigh 1",
    )
    concurrent: bool = Field(
        True,
        description="score a batch with all rewards at once, each in its own thread (false: "
        "one after the other, for rewards that are not thread-safe)",
    )
    timeout_s: float | None = Field(
        3600.0,
        gt=0,
        description="seconds one reward call may take before the run stops naming it (a hung "
        "reward); null: no limit",
    )
    combine: Literal["weighted", "gdpo"] = "weighted"
    adv_std: Literal["global", "group"] = "global"
    adv_clip: float | None = Field(None, gt=0)
    max_invalid_fraction: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="samples with a NaN/inf reward are excluded; abort above this fraction",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="keyword options per reward, {name: {key: value}} (e.g. a model path)",
    )

    @field_validator("names", "plugins", mode="before")
    @classmethod
    def _one_or_comma_separated(cls, v: Any) -> Any:
        # reward.names=digit_prob on a command line is a string, not a one-item list:
        # read a string as comma-separated names (an import path holds no comma).
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        # One plain message per weight, instead of one per branch of the union.
        if not isinstance(v, dict):
            return v
        form = "a number or a warm-up {value: W, warmup_iterations: N, start: W0 (default 0)}"
        out: dict[str, Any] = {}
        for name, w in v.items():
            if isinstance(w, dict):
                keys = set(WeightSchedule.model_fields)
                if set(w) - keys or not {"value", "warmup_iterations"} <= set(w):
                    raise ValueError(f"{name!r}: {w} is not {form}")
                try:
                    out[name] = WeightSchedule(**w)
                except ValidationError as exc:
                    problems = "; ".join(
                        f"{'.'.join(map(str, e['loc']))} {e['msg'].lower()}" for e in exc.errors()
                    )
                    raise ValueError(f"{name!r}: {problems}") from None
            elif isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w):
                out[name] = w
            else:
                raise ValueError(f"{name!r}: {w!r} is not {form}")
        return out

    @model_validator(mode="after")
    def _options_name_rewards(self) -> RewardConfig:
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"names lists {dup} more than once")
        unknown = sorted(set(self.options) - set(self.names)) if self.names else []
        if unknown:
            raise ValueError(f"options names {unknown}, which are not in reward.names {self.names}")
        return self


def reward_weights(cfg: RewardConfig, iteration: int) -> dict[str, float]:
    """Every weighted reward's weight at ``iteration`` (0-based)."""
    return {
        name: w.at(iteration) if isinstance(w, WeightSchedule) else float(w)
        for name, w in cfg.weights.items()
    }


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
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch; null: the task's recommendation"
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

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"both Adam betas must be in [0, 1), got {list(v)}")
        return v


#: ``auto`` and the adapter modules of ``flowdppo.models.diffusers_adapters`` (kept in step
#: with its ADAPTER_MODULES; a test checks).
DIFFUSERS_KINDS = (
    "auto",
    "sd3",
    "flux",
    "wan",
    "flux2",
    "qwen_image",
    "z_image",
    "hunyuan_video15",
)
MODEL_KINDS = ("task", *DIFFUSERS_KINDS)


class ModelConfig(_Section):
    weights: PathKey = Field(None, description="base weights path; null: the task's shipped")
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] | None = Field(None, description="null: the task's default")
    # A diffusers pipeline instead of the task's own model (docs/real-models.md).
    kind: str | None = Field(
        None,
        description="task: the task's built-in model; auto: the diffusers adapter that takes "
        "model.path's pipeline class; or one adapter by name (sd3, flux, wan, flux2, "
        "qwen_image, z_image, hunyuan_video15); null: auto when model.path is set, else task",
    )
    path: PathKey = Field(None, description="local diffusers pipeline directory")
    adapter: str | None = Field(
        None, description="a user adapter class by import path, package.module:Class"
    )
    resolution: int | tuple[int, int] | None = Field(
        None, description="pixels, int or [height, width]; null: the adapter's default"
    )
    frames: int | None = Field(
        None, ge=1, description="video frames (video models only); null: the adapter's default"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    gradient_checkpointing: bool = False
    max_sequence_length: int | None = Field(
        None, ge=1, description="text tokens (T5); null: the pipeline's default"
    )
    negative_prompt: str = Field("", description="the negative prompt of guidance")
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (CUDA when available)")
    offload_text_encoders: bool = Field(
        True,
        description="keep the text encoders (and the unused VAE encoder) in CPU memory and the "
        "prompt cache on the CPU; the encoders visit the device only to encode new prompts",
    )
    forward_batch_size: int | None = Field(
        None,
        ge=1,
        description="samples per model forward in rollout, reference KL and evaluation, and "
        "the default batch of model rewards; null: the whole batch in one forward",
    )

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        if v is not None and v not in MODEL_KINDS:
            near = difflib.get_close_matches(str(v), MODEL_KINDS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"must be one of {', '.join(MODEL_KINDS)}, got {v!r}{hint}")
        return v

    @model_validator(mode="after")
    def _default_kind(self):
        if self.kind is None:
            # Not through validate_assignment: it would run this validator again.
            object.__setattr__(self, "kind", "auto" if self.path or self.adapter else "task")
        return self

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v):
        sides = (v,) if isinstance(v, int) else (v or ())
        if any(s < 8 for s in sides):
            raise ValueError(f"must be at least 8 pixels per side, got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        head, _, index = v.partition(":")
        if v in ("cpu", "cuda", "auto") or (head == "cuda" and index.isdigit()):
            return v
        raise ValueError(f"must be cpu, cuda, cuda:N or auto, got {v!r}")


class DataConfig(_Section):
    train_prompts: PathKey = Field(
        None, description="task prompts: text file, one training prompt per line"
    )
    heldout_prompts: PathKey = Field(
        None, description="task prompts: text file of prompts never trained on (optional)"
    )
    eval_prompts: int = Field(
        8, ge=1, description="task prompts: evaluate on the first N prompts of each file"
    )


class LogConfig(_Section):
    run_dir: PathKey = Field(None, description="null: runs/<name>-<time>")
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(
        10, ge=0, description="iterations between evaluations and their sample grids (0: end only)"
    )
    eval_samples_per_prompt: int = Field(16, ge=1)
    eval_prompts: int | None = Field(
        None,
        ge=1,
        description="evaluate on the first N trained and N held-out prompts of a built-in "
        "task (task prompts: data.eval_prompts); null: all of them",
    )
    ref_kl: bool = Field(True, description="log the KL to the reference model during training")
    ref_kl_every: int | None = Field(
        None,
        ge=1,
        description="measure it every N iterations; null: 1 for built-in tasks, 10 for "
        "diffusers models",
    )
    ref_kl_samples: int | None = Field(
        None,
        ge=1,
        description="samples per group it is measured on, drawn at random (an unbiased "
        "estimate of the batch's KL); null: the whole group for built-in tasks, 1 for "
        "diffusers models",
    )
    tensorboard: bool = True
    grid_rewards: bool = Field(True, description="print each sample's reward under it in grids")
    wandb: bool = Field(False, description="also log to Weights & Biases (the wandb extra)")
    wandb_project: str = "flowdppo"
    wandb_name: str | None = Field(None, description="wandb run name; null: the run's name")
    wandb_mode: Literal["online", "offline"] | None = Field(
        None, description="null: wandb's own (WANDB_MODE, else online); offline: no network"
    )


class Continuation(_Section):
    """One ``flowdppo train --resume RUN train.iterations=N`` that extended a run."""

    at_iteration: int = Field(ge=0, description="the checkpoint the run continued from")
    iterations_before: int = Field(ge=1)
    iterations_after: int = Field(ge=1)
    time: str = Field(description="when, in UTC (ISO 8601)")


class Config(_Section):
    name: str | None = Field(None, description="run name; null: ALGORITHM-TASK")
    task: str = "digits"
    algorithm: str = Field(
        "dppo",
        description="dppo, grpo, cps, guard, nft, dance, or OBJECTIVE+KERNEL such as dppo+cps",
    )
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    nft: NftConfig = Field(default_factory=NftConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    history: list[Continuation] = Field(
        default_factory=list,
        description="written by flowdppo: each continuation of the run past its budget",
    )

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, v: str) -> str:
        parse_algorithm(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _cps_recipe(cls, data: Any) -> Any:
        # Ratio clipping with the CPS kernel defaults to Flow-GRPO's CPS recipe: the sampler
        # keys a config leaves out take the recipe's values.
        if not isinstance(data, dict) or not isinstance(data.get("sampler", {}), dict):
            return data
        try:
            if parse_algorithm(str(data.get("algorithm", "dppo"))) != ("clip", "cps"):
                return data
        except ValueError:
            return data  # the field validator reports it
        return {**data, "sampler": {**CPS_RECIPE, **data.get("sampler", {})}}

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        s = self.sampler
        first, stop = sde_window_bounds(s.num_steps, s.sde_window)
        in_window = stop - first
        if s.num_sde_steps > s.num_steps:
            raise ValueError(
                f"sampler.num_sde_steps ({s.num_sde_steps}) is more than sampler.num_steps "
                f"({s.num_steps})"
            )
        if s.num_sde_steps > in_window:
            raise ValueError(
                f"sampler.num_sde_steps ({s.num_sde_steps}) is more than the "
                f"{in_window} steps in sampler.sde_window {list(s.sde_window)} of "
                f"sampler.num_steps = {s.num_steps}: widen the window or draw fewer"
            )
        if self.kernel == "cps" and s.eta > 1:
            raise ValueError(f"sampler.eta must be <= 1 with the cps kernel, got {s.eta}")
        if s.eta == 0:
            raise ValueError("sampler.eta must be > 0: with eta = 0 no step is stochastic")
        check_trust_region_forms(self.objective, s.log_prob_reduce)
        self._check_algorithm_options()
        if self.log.ref_kl_samples is not None and self.log.ref_kl_samples > self.train.group_size:
            raise ValueError(
                f"log.ref_kl_samples ({self.log.ref_kl_samples}) is more than the "
                f"train.group_size ({self.train.group_size}) samples of a group: lower it, or "
                "set it to null for the whole group"
            )
        if self.objective_name == "clip" and s.log_prob_reduce == "sum":
            self._check_summed_clip_window()
        self._check_model_and_data()
        return self

    def _check_algorithm_options(self) -> None:
        # An option another method reads is refused rather than silently ignored, so that
        # a run never reports a setting that did not shape it.
        name, o = self.objective_name, self.objective
        fields = ObjectiveConfig.model_fields
        for key, allowed in OBJECTIVE_OPTION_OWNERS.items():
            if name not in allowed and getattr(o, key) != fields[key].default:
                users = ", ".join(a for a in OBJECTIVES if OBJECTIVES[a] in allowed)
                raise ValueError(
                    f"objective.{key} is an option of {users} (and their OBJECTIVE+KERNEL "
                    f"forms), not of algorithm {self.algorithm!r}: drop it"
                )
        nft_set = [
            k for k, f in NftConfig.model_fields.items() if getattr(self.nft, k) != f.default
        ]
        if name != "nft" and nft_set:
            key = nft_set[0]
            raise ValueError(
                f"nft.{key} is an option of algorithm nft, not of {self.algorithm!r}: drop it"
            )
        s = self.sampler
        if name in ("guard", "nft") and s.score != "gaussian":
            raise ValueError(
                f"sampler.score {s.score!r} is for ratio clipping; {self.algorithm} needs the "
                "Gaussian log-density (guard) or no log-probs at all (nft): drop it"
            )
        if name == "guard" and s.log_prob_reduce != "mean":
            raise ValueError(
                "algorithm guard normalises element-mean log-probs (its published form): "
                "drop sampler.log_prob_reduce = sum"
            )

    def _check_summed_clip_window(self) -> None:
        # A clip range is a ratio window 1 +- eps, read as a log-ratio window of d x eps
        # nats to first order, which needs eps << 1. With summed log-probs eps is the
        # per-step value itself, and a window of several nats (the default) has no such
        # range. Checked here, before any work, since it does not depend on the model.
        o = self.objective
        for key in ("clip_range", "clip_range_high"):
            step = getattr(o, f"{key}_per_step")
            if getattr(o, key) is None and step is None:
                cps = key == "clip_range" and self.kernel == "cps" and self.sampler.score == "cps"
                step = CPS_CLIP_RANGE_PER_STEP if cps else TRUST_REGION_KEYS[key]
            if getattr(o, key) is None and step is not None and step >= 1:
                raise ValueError(
                    f"objective.{key}_per_step = {step:g} nats is not a ratio window 1 +- eps "
                    f"with eps < 1 under sampler.log_prob_reduce = sum (eps is the per-step "
                    f"value there): set objective.{key} directly for this reduction"
                )

    def _check_model_and_data(self) -> None:
        m, d = self.model, self.data
        if self.task == "prompts" and self.log.eval_prompts is not None:
            raise ValueError(
                "log.eval_prompts is for built-in tasks; task 'prompts' evaluates on the first "
                "data.eval_prompts prompts of each file: set that instead"
            )
        if m.kind in DIFFUSERS_KINDS:
            if self.task != "prompts":
                raise ValueError(
                    f"model.kind {m.kind!r} trains on prompts from text files: set task=prompts "
                    f"(and data.train_prompts), not task={self.task!r}"
                )
            if m.weights is not None:
                raise ValueError(
                    "model.weights is for a task's built-in model; a diffusers model loads "
                    "from model.path"
                )
        else:
            if self.task == "prompts":
                raise ValueError(
                    "task 'prompts' needs a diffusers model: set model.path to its directory "
                    f"(model.kind auto, or one of {', '.join(DIFFUSERS_KINDS[1:])})"
                )
            pipeline_keys = (
                "path",
                "adapter",
                "resolution",
                "frames",
                "dtype",
                "gradient_checkpointing",
                "max_sequence_length",
                "negative_prompt",
                "device",
                "offload_text_encoders",
            )
            fields = ModelConfig.model_fields
            set_keys = [k for k in pipeline_keys if getattr(m, k) != fields[k].default]
            if set_keys:
                raise ValueError(
                    f"model.{set_keys[0]} is for diffusers models; set model.kind to one of "
                    f"{', '.join(DIFFUSERS_KINDS)} or drop it"
                )
        if m.adapter is not None and m.kind != "auto":
            raise ValueError(
                f"model.adapter chooses the adapter itself: set model.kind=auto (or leave it "
                f"unset), not {m.kind!r}"
            )
        g2 = self.sampler.guidance_scale_2
        if g2 is not None and m.kind not in ("wan", "auto"):
            raise ValueError(
                "sampler.guidance_scale_2 is the low-noise expert's guidance of a two-expert "
                f"Wan 2.2 pipeline (model.kind wan), not of model.kind {m.kind!r}: drop it"
            )
        if g2 is not None and self.sampler.guidance_scale == 1.0:
            raise ValueError(
                "sampler.guidance_scale_2 needs guidance on (sampler.guidance_scale > 1): "
                "WanPipeline guides neither expert when guidance_scale is 1"
            )
        if self.task != "prompts":
            for key, field in DataConfig.model_fields.items():
                if getattr(d, key) != field.default:
                    raise ValueError(
                        f"data.{key} is read by task 'prompts' only (this run's task is "
                        f"{self.task!r})"
                    )

    @property
    def run_name(self) -> str:
        return self.name or f"{self.algorithm.replace('+', '-')}-{self.task}"

    @property
    def objective_name(self) -> str:
        return parse_algorithm(self.algorithm)[0]

    @property
    def kernel(self) -> str:
        return parse_algorithm(self.algorithm)[1]

    @property
    def samples_per_iteration(self) -> int:
        return self.train.prompts_per_iteration * self.train.group_size


def ref_kl_plan(cfg: Config) -> tuple[int, int | None]:
    """(every how many iterations the reference KL is measured, samples per group or None
    for all). Unset, a diffusers model measures one sample per group every 10 iterations,
    so that it costs about a thousandth of the rollout and update's forwards
    (docs/cost.md); a built-in task's model is cheap and measures everything."""
    real = cfg.model.kind in DIFFUSERS_KINDS
    every = cfg.log.ref_kl_every or (10 if real else 1)
    samples = (
        cfg.log.ref_kl_samples if cfg.log.ref_kl_samples is not None else (1 if real else None)
    )
    if samples is not None and samples >= cfg.train.group_size:
        samples = None
    return every, samples


def sde_window_bounds(num_steps: int, window: tuple[float, float]) -> tuple[int, int]:
    """``(first, stop)``: the steps ``k`` with ``lo <= k / num_steps < hi``.

    Found from ``lo * n`` and ``hi * n`` and then checked with the same division the
    sampler uses, so validating a config costs the same for 10 steps as for 10**20 (a
    list of every step would not fit in memory for a huge value)."""
    lo, hi = window

    def first_at_or_above(threshold: float) -> int:
        k = max(0, min(num_steps, math.floor(threshold * num_steps) - 2))
        while k < num_steps and k / num_steps < threshold:
            k += 1
        return k

    return first_at_or_above(lo), first_at_or_above(hi)


def per_step_factor(latent_elements: int, log_prob_reduce: str) -> int:
    """Nats per step of one unit of a per-element threshold: d for element-mean log-probs,
    1 for summed ones (a summed KL already is per step)."""
    return latent_elements if log_prob_reduce == "mean" else 1


def check_trust_region_forms(obj: ObjectiveConfig, log_prob_reduce: str) -> None:
    """Each trust-region value is given in one form; a run's own config.yaml records both,
    with the latent size that makes them agree."""
    for key in TRUST_REGION_KEYS:
        elem, step = getattr(obj, key), getattr(obj, f"{key}_per_step")
        if elem is None or step is None:
            continue
        d = obj.latent_elements
        if d is None:
            raise ValueError(
                f"objective.{key} and objective.{key}_per_step are both set: set one of them "
                f"(per step = d x per element, d the latent elements per sample)"
            )
        expected = elem * per_step_factor(d, log_prob_reduce)
        if not math.isclose(step, expected, rel_tol=1e-9):
            raise ValueError(
                f"objective.{key} = {elem:g} and objective.{key}_per_step = {step:g} disagree "
                f"for objective.latent_elements = {d} (expected {expected:g} per step): set "
                f"one of them and drop the other"
            )


def resolve_trust_region(cfg: Config, latent_elements: int) -> Config:
    """``cfg`` with every trust-region value in both forms, for a model whose samples have
    ``latent_elements`` latent elements (a ConfigError if the config was resolved for
    another size)."""
    obj = cfg.objective
    if cfg.objective_name not in _TRUST:
        return cfg  # guard and nft have no per-element / per-step pair
    if obj.latent_elements is not None and obj.latent_elements != latent_elements:
        raise ConfigError(
            f"objective.latent_elements is {obj.latent_elements}, but this model's samples "
            f"have {latent_elements} latent elements: the run was set up for another model "
            f"or resolution; drop objective.latent_elements (and one form of each threshold)"
        )
    factor = per_step_factor(latent_elements, cfg.sampler.log_prob_reduce)
    values: dict[str, Any] = {"latent_elements": latent_elements}
    defaults = dict(TRUST_REGION_KEYS)
    if cfg.kernel == "cps" and cfg.sampler.score == "cps":
        defaults["clip_range"] = CPS_CLIP_RANGE_PER_STEP
    if cfg.kernel == "cps" and cfg.objective_name == "dppo":
        defaults["dppo_threshold"] = DPPO_CPS_THRESHOLD_PER_STEP
    for key, default_per_step in defaults.items():
        elem, step = getattr(obj, key), getattr(obj, f"{key}_per_step")
        if elem is None and step is None:
            step = default_per_step
        if step is None:
            step = None if elem is None else elem * factor
        elif elem is None:
            elem = step / factor
        values[key], values[f"{key}_per_step"] = elem, step
    return cfg.model_copy(update={"objective": obj.model_copy(update=values)})


def describe_trust_region(cfg: Config) -> str:
    """One line: the trust region of a resolved config in both forms."""
    o = cfg.objective
    if cfg.objective_name == "guard":
        return f"GRPO-Guard clip range {o.guard_clip_range:.4g} on the normalised log-ratio"
    if cfg.objective_name == "nft":
        return f"DiffusionNFT beta {cfg.nft.beta:g}: no trust region on the policy"
    if o.latent_elements is None:
        raise ValueError("describe_trust_region needs a resolved config (resolve_trust_region)")
    unit = "per element" if cfg.sampler.log_prob_reduce == "mean" else "(summed log-probs)"
    if cfg.objective_name == "dppo":
        head = (
            f"Flow-DPPO threshold {o.dppo_threshold:.4g} {unit} = {o.dppo_threshold_per_step:.4g}"
        )
    else:
        head = f"clip range {o.clip_range:.4g} {unit} = {o.clip_range_per_step:.4g}"
        if o.clip_range_high is not None:
            head += f" (high {o.clip_range_high:.4g} = {o.clip_range_high_per_step:.4g})"
    return f"{head} nats per step (d = {o.latent_elements} latent elements)"


def parse_algorithm(name: str) -> tuple[str, str]:
    """``"dppo+cps"`` -> ``("dppo", "cps")``: the objective and the kernel."""
    head, _, kernel = name.partition("+")
    kernels = KERNELS + (("ode",) if head == "nft" else ())
    if head not in OBJECTIVES or (kernel and kernel not in kernels):
        raise ValueError(
            f"unknown algorithm {name!r}: use one of {', '.join(PAPER_ALGORITHMS)} (the "
            f"paper's six), dance, or OBJECTIVE+KERNEL with OBJECTIVE in (dppo, clip, guard, "
            f"nft) and KERNEL in {KERNELS} (nft also ode), e.g. guard+cps"
        )
    return OBJECTIVES[head], kernel or KERNEL_OF_PRESET[head]


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            section = _section_model(loc[:-1])
            options = list(section.model_fields)
            lines.append(
                f"unknown key {key!r}{_suggest(str(loc[-1]), options)}; valid keys here: "
                f"{', '.join(options)}"
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) or "got" in msg else f" (got {got!r})"
            lines.append(f"{key}: {msg}{shown}" if key else msg)
    return "\n  ".join(lines)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"override {dotted!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
            )
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-3", "algorithm=grpo"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.iterations=20)"
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
        _set_path(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# Byte-order marks of the encodings a text editor may save a file in, longest first.
_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    name = repr(str(path))
    if path.is_dir():
        raise ConfigError(f"config file {name} is a directory, not a YAML file")
    if not path.exists():
        raise ConfigError(f"config file {name} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {name} cannot be read: {exc.strerror or exc}") from exc
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), None)
    if encoding is not None:
        raise ConfigError(
            f"config file {name} is {encoding} text; flowdppo reads UTF-8: save it as UTF-8 "
            f"(e.g. iconv -f {encoding.split()[0]} -t UTF-8)"
        )
    if b"\x00" in raw:
        raise ConfigError(
            f"config file {name} holds NUL bytes: it is UTF-16 or UTF-32 without a byte-order "
            "mark, or not text at all; save it as UTF-8"
        )
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is harmless: accept it
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {name} is not valid YAML: {exc}") from exc
    if data is None:
        # An empty file is more often a failed write or the wrong path than a wish for the
        # defaults, which `flowdppo train` with no file gives; `{}` says it on purpose.
        raise ConfigError(
            f"config file {name} is empty (no keys); to run the defaults give no config "
            "file, or write {} in it"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {name} must hold a mapping of keys, got {type(data).__name__}"
        )
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and overrides.

    Precedence, lowest first: the defaults, ``base`` (a task's recommended settings), the
    YAML file, the overrides.
    """
    overrides = list(overrides or [])
    tree = _merge(base or {}, read_yaml(path) if path is not None else {})
    tree = _merge(tree, parse_overrides(overrides))
    origin = str(path) if path else "the task's recommended settings" if base else "defaults"
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        source = _source_of(err, origin, overrides)
        raise ConfigError(f"invalid configuration ({source}):\n  {_explain(err)}") from None


def _source_of(err: ValidationError, origin: str, overrides: list[str]) -> str:
    """Where the values behind ``err`` came from: the overrides that set an offending key,
    else the file (or the defaults); a check across sections names both."""
    keys = {item: item.partition("=")[0].split(".") for item in overrides}
    blamed, unblamed = [], False
    across = any(not e["loc"] for e in err.errors())
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # An override sets the offending key, a key inside it, or the section holding it.
        hits = [item for item, key in keys.items() if loc and key[: len(loc)] == loc[: len(key)]]
        blamed += [h for h in hits if h not in blamed]
        unblamed = unblamed or not hits
    if not blamed:
        return f"{origin} with overrides {', '.join(overrides)}" if across and overrides else origin
    head = f"override{'s' if len(blamed) > 1 else ''} {', '.join(blamed)}"
    return f"{head}; {origin}" if unblamed else head


def config_from_dict(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration ({source}):\n  {_explain(err)}") from None


def dump_config(cfg: Config) -> str:
    # Only a DiffusionNFT run records the nft section (every other method refuses it).
    exclude = None if cfg.objective_name == "nft" else {"nft"}
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=exclude), sort_keys=False)
