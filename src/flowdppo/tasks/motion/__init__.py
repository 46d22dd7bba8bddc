"""The built-in "motion" task: short clips of moving shapes, scored exactly frame by frame.

* prompts: one or two shapes, each with a colour, an optional size, a direction and an
  optional speed, ``a small yellow circle moving down fast``; captions with a held-out
  shape-direction pair are held out (:mod:`.grammar`);
* clips: 8 frames of 24x24 RGB (d = 13,824 latent elements), flat shapes on black moving in
  straight lines (:mod:`.clips`);
* base model: the shared flow transformer with spatio-temporal patches, pretrained on
  rendered clips (``assets/motion_base.safetensors``, :mod:`.model`, :mod:`.pretraining`);
* rewards (:mod:`.score`, registered by :mod:`.rewards`): ``motion`` (the fraction of the
  caption's sub-conditions that hold: shape, colour, size, direction, speed of each object
  and the count, found by the shapes task's detector in every frame and tracked across
  frames) and ``motion_strict`` (all of them).

See ``docs/motion-task.md``.
"""

from __future__ import annotations

from flowdppo.tasks import register_builtin_task
from flowdppo.tasks.blocks import LORA_TARGETS
from flowdppo.tasks.motion.clips import (
    CLIP_SHAPE,
    FRAME_SIZE,
    FRAMES,
    Track,
    clip_batch,
    layout,
    render_clip,
    sample_clip,
)
from flowdppo.tasks.motion.grammar import (
    HELDOUT_PAIRS,
    HELDOUT_PROMPTS,
    TRAIN_PROMPTS,
    MotionSpec,
    MovingObject,
    PromptError,
    group_of,
    parse_prompt,
    tokenize,
)
from flowdppo.tasks.motion.model import (
    BASE_WEIGHTS,
    MotionAssetError,
    MotionModel,
    MotionVelocityNet,
    load_base_model,
)
from flowdppo.tasks.motion.pretraining import pretrain, pretrain_base_model
from flowdppo.tasks.motion.score import ClipCheck, MotionReward, check_clips, summary

__all__ = [
    "BASE_WEIGHTS",
    "CLIP_SHAPE",
    "FRAMES",
    "FRAME_SIZE",
    "HELDOUT_PAIRS",
    "HELDOUT_PROMPTS",
    "LORA_TARGETS",
    "TRAIN_PROMPTS",
    "ClipCheck",
    "MotionAssetError",
    "MotionModel",
    "MotionReward",
    "MotionSpec",
    "MotionVelocityNet",
    "MovingObject",
    "PromptError",
    "Track",
    "check_clips",
    "clip_batch",
    "group_of",
    "layout",
    "load_base_model",
    "parse_prompt",
    "pretrain",
    "pretrain_base_model",
    "render_clip",
    "sample_clip",
    "summary",
    "tokenize",
]

register_builtin_task(
    "motion",
    __name__,
    default_rewards=["motion"],
    description=(
        "video: clips of moving shapes (8 frames of 24x24 RGB, d = 13,824) from a small "
        "caption-conditioned spatio-temporal flow transformer; reward: an exact detector "
        "tracks every object across frames and scores shape, colour, size, direction, speed "
        "and count"
    ),
    eval_group=group_of,
    parse_prompt=parse_prompt,
    # One thread, as shapes and text: the small network gains little from a second one,
    # and loses much when the other core is busy.
    threads=1,
    recommended={
        "train": {"iterations": 80, "prompts_per_iteration": 8, "group_size": 8},
        "log": {"eval_every": 40, "checkpoint_every": 40, "eval_samples_per_prompt": 2},
    },
)
