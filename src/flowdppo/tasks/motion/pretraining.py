"""Seeded, reproducible pretraining of the motion base model (CPU, one thread).

Every step renders a fresh batch of random clips with their captions (the whole grammar:
both splits, as a foundation model would have seen them) and takes one rectified-flow step
(the loop and its recipe: :mod:`flowdppo.tasks.pretraining`, shared with shapes and text).
Same seed, same torch build and CPU type: bit-identical weights.
"""

from __future__ import annotations

from flowdppo.tasks.motion.clips import clip_batch
from flowdppo.tasks.motion.grammar import tokenize
from flowdppo.tasks.motion.model import BASE_WEIGHTS, SHIFT, MotionVelocityNet
from flowdppo.tasks.pretraining import PretrainRecipe

#: Pretraining length of the shipped base model (see docs/motion-task.md for its scores).
BASE_STEPS = 1800

# One thread, as shapes and text: the machine's other core is often busy, and one thread
# gives the same bytes whatever the core count.
RECIPE = PretrainRecipe(
    "motion", MotionVelocityNet, clip_batch, tokenize, BASE_WEIGHTS, BASE_STEPS,
    batch_size=32, threads=1, sigma_shift=SHIFT,
)  # fmt: skip
pretrain_base_model = RECIPE.train
pretrain = RECIPE.pretrain
