"""The built-in "digits" task: real 8x8 handwritten digits, prompted by name ("zero" ... "nine").

* data: scikit-learn's bundled digits (no download), a fixed stratified 80/20 split;
* base model: a small class-conditional flow-matching MLP (``assets/digits_base.safetensors``);
* rewards: ``digit_prob`` (a CNN classifier's probability of the prompted digit) and
  ``digit_smoothness`` (a total-variation image-quality proxy);
* prompts: RL trains on "zero".."six"; "seven".."nine" are held out to measure forgetting.

See ``docs/digits-task.md``.
"""

from __future__ import annotations

from flowdppo.tasks import register_builtin_task
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


register_builtin_task(
    "digits",
    __name__,
    default_rewards=["digit_prob"],
    description=(
        "8x8 handwritten digits (scikit-learn) from a small class-conditional flow MLP; "
        "reward: a CNN classifier's probability of the prompted digit"
    ),
    # The network is so small that a second CPU thread costs more in synchronisation than
    # it saves: one thread is several times faster on a 2-core machine.
    threads=1,
)
