"""A whole run's :class:`Config`: the top-level keys, the sections, and the checks across them."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from flowdppo.config.algorithm import OBJECTIVES, parse_algorithm
from flowdppo.config.base import _Section
from flowdppo.config.data import DataConfig
from flowdppo.config.log import LogConfig
from flowdppo.config.model import DIFFUSERS_KINDS, ModelConfig
from flowdppo.config.nft import NftConfig
from flowdppo.config.objective import OBJECTIVE_OPTION_OWNERS, ObjectiveConfig
from flowdppo.config.reward import RewardConfig
from flowdppo.config.sampler import SamplerConfig, sde_window_bounds
from flowdppo.config.train import TRAIN_OPTION_OWNERS, TrainConfig
from flowdppo.config.trust_region import (
    CPS_CLIP_RANGE_PER_STEP,
    CPS_RECIPE,
    TRUST_REGION_KEYS,
    check_trust_region_forms,
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
        lg = self.log
        eval_window = lg.eval_sde_window or s.sde_window
        if not 0.0 <= eval_window[0] < eval_window[1] <= 1.0:
            raise ValueError(
                f"log.eval_sde_window must satisfy 0 <= lo < hi <= 1, got {list(eval_window)}"
            )
        eval_first, eval_stop = sde_window_bounds(s.num_steps, eval_window)
        if (lg.eval_sde_steps or s.num_sde_steps) > eval_stop - eval_first:
            raise ValueError(
                f"log.eval_sde_steps ({lg.eval_sde_steps or s.num_sde_steps}) is more than the "
                f"{eval_stop - eval_first} steps in the window {list(eval_window)} of "
                f"sampler.num_steps = {s.num_steps}: widen log.eval_sde_window or draw fewer"
            )
        if self.kernel == "cps" and s.eta > 1:
            raise ValueError(f"sampler.eta must be <= 1 with the cps kernel, got {s.eta}")
        if s.eta == 0:
            raise ValueError("sampler.eta must be > 0: with eta = 0 no step is stochastic")
        if s.ode_stride > s.num_steps:
            raise ValueError(
                f"sampler.ode_stride ({s.ode_stride}) is more than sampler.num_steps "
                f"({s.num_steps}): a stride of {s.num_steps} already runs every deterministic "
                "stretch in one step"
            )
        if s.shared_prefix and self.kernel == "ode":
            raise ValueError(
                f"sampler.shared_prefix branches a group at its first SDE step, and algorithm "
                f"{self.algorithm!r} samples with no SDE step (every member of a group would be "
                "the same sample): drop it, or sample with an SDE kernel (e.g. nft+flow)"
            )
        if s.merge_lora:
            self._check_merge_lora()
        check_trust_region_forms(self.objective, s.log_prob_reduce)
        self._check_algorithm_options()
        self._check_trained_steps(first, stop)
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

    def _check_merge_lora(self) -> None:
        m = self.model
        if m.kind != "task" and m.dtype != "float32":
            raise ValueError(
                f"sampler.merge_lora needs float32 weights, and model.dtype is {m.dtype!r}: a "
                "LoRA update folded into low-precision weights is mostly rounded away. Set "
                "model.dtype=float32 or drop sampler.merge_lora"
            )

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
        for key, allowed in TRAIN_OPTION_OWNERS.items():
            if name not in allowed and getattr(self.train, key) is not None:
                users = ", ".join(a for a in OBJECTIVES if OBJECTIVES[a] in allowed)
                raise ValueError(
                    f"train.{key} is an option of {users} (and their OBJECTIVE+KERNEL forms), "
                    f"not of algorithm {self.algorithm!r}: drop it"
                )
        if name == "nft" and self.train.fuse_steps:
            raise ValueError(
                "train.fuse_steps batches the recorded SDE steps of a minibatch, and algorithm "
                f"{self.algorithm!r} trains on noise levels drawn per sample instead: drop it"
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

    def _check_trained_steps(self, first: int, stop: int) -> None:
        # Every iteration must replay at least one step: the SDE steps are drawn anew each
        # time, so fewer candidates than draws may lie outside the trained range.
        span = self.train.trained_steps
        if span is None:
            return
        n = self.sampler.num_steps
        if span[1] > n:
            raise ValueError(
                f"train.trained_steps {list(span)} reaches past the sampler.num_steps = {n} "
                f"steps (0 to {n - 1}): use a stop <= {n}"
            )
        outside = sum(1 for k in range(first, stop) if not span[0] <= k < span[1])
        if outside >= self.sampler.num_sde_steps:
            raise ValueError(
                f"train.trained_steps {list(span)} can miss every SDE step: "
                f"{self.sampler.num_sde_steps} drawn from sampler.sde_window "
                f"{list(self.sampler.sde_window)} (steps {first} to {stop - 1}) may all fall "
                "outside it; widen the range or draw more steps"
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
                # Name what made it a diffusers model: model.path or model.adapter (which
                # make an unset model.kind 'auto'), else model.kind itself.
                given = [
                    f"model.{k} {getattr(m, k)!r}"
                    for k in ("path", "adapter")
                    if getattr(m, k) is not None
                ]
                source = f"model.kind {m.kind!r}"
                if given:
                    source = f"{' and '.join(given)} (a diffusers model, {source})"
                raise ValueError(
                    f"{source} trains on prompts from text files: set task=prompts (and "
                    f"data.train_prompts), not task={self.task!r}; task {self.task!r} trains "
                    "its built-in model (model.kind task, no model.path or model.adapter)"
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
            # A built-in task with a grammar (motion) reads prompt files too; the task
            # refuses them when it has none (tasks.prompts.grammar_prompts).
            for key, field in DataConfig.model_fields.items():
                if key in ("train_prompts", "heldout_prompts"):
                    continue
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
