"""The built-in "digits" task: real 8x8 handwritten digits, prompted by name ("zero" ... "nine").

* data: scikit-learn's bundled digits (no download), a fixed stratified 80/20 split;
* base model: a small class-conditional flow-matching MLP (``assets/digits_base.safetensors``);
* rewards: ``digit_prob`` (a CNN classifier's probability of the prompted digit) and
  ``digit_smoothness`` (a total-variation image-quality proxy);
* prompts: RL trains on "zero".."six"; "seven".."nine" are held out to measure forgetting.

See ``docs/digits-task.md``.
"""

from __future__ import annotations

from flowdppo.tasks import Task, register_task
from flowdppo.tasks.digits.data import (
    DIGIT_NAMES,
    HELDOUT_PROMPTS,
    NULL_LABEL,
    TRAIN_PROMPTS,
    DigitsData,
    load_digits_split,
    prompt_to_label,
    prompts_to_labels,
)
from flowdppo.tasks.digits.evaluate import euler_sample, evaluate_base
from flowdppo.tasks.digits.model import (
    LORA_TARGETS,
    DigitsAssetError,
    DigitsModel,
    DigitsVelocityNet,
    assets_dir,
    load_base_model,
)
from flowdppo.tasks.digits.pretrain import pretrain, pretrain_base_model, pretrain_classifier
from flowdppo.tasks.digits.rewards import (
    DigitClassifier,
    digit_smoothness,
    load_classifier,
    make_digit_prob,
)

__all__ = [
    "DIGIT_NAMES",
    "HELDOUT_PROMPTS",
    "LORA_TARGETS",
    "NULL_LABEL",
    "TRAIN_PROMPTS",
    "DigitClassifier",
    "DigitsAssetError",
    "DigitsData",
    "DigitsModel",
    "DigitsVelocityNet",
    "assets_dir",
    "digit_smoothness",
    "euler_sample",
    "evaluate_base",
    "load_base_model",
    "load_classifier",
    "load_digits_split",
    "make_digit_prob",
    "pretrain",
    "pretrain_base_model",
    "pretrain_classifier",
    "prompt_to_label",
    "prompts_to_labels",
]


@register_task("digits")
def digits_task() -> Task:
    return Task(
        name="digits",
        build_model=load_base_model,
        default_rewards=["digit_prob"],
        train_prompts=list(TRAIN_PROMPTS),
        heldout_prompts=list(HELDOUT_PROMPTS),
        description=(
            "8x8 handwritten digits (scikit-learn) from a small class-conditional flow MLP; "
            "reward: a CNN classifier's probability of the prompted digit"
        ),
        # The network is so small that a second CPU thread costs more in synchronisation than it
        # saves: one thread is several times faster on a 2-core machine.
        extra={"lora_targets": list(LORA_TARGETS), "pretrain": pretrain, "threads": 1},
    )
