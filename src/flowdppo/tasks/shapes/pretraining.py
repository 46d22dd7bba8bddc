"""Seeded, reproducible pretraining of the shapes base model (CPU, about 5 minutes on 2 cores).

Every step renders a fresh batch of random scenes with their captions (skills drawn
uniformly, captions from the full grammar: both splits, as a foundation model would have
seen them) and takes one rectified-flow step; captions are dropped to the null caption with
probability 0.1 for classifier-free guidance (the loop and its recipe:
:mod:`flowdppo.tasks.pretraining`). Same seed, same torch build and thread count:
bit-identical weights.
"""

from __future__ import annotations

from flowdppo.tasks.pretraining import PretrainRecipe
from flowdppo.tasks.shapes.grammar import tokenize
from flowdppo.tasks.shapes.model import BASE_WEIGHTS, ShapesVelocityNet
from flowdppo.tasks.shapes.scenes import scene_batch

#: Pretraining length of the shipped base model: about 5 minutes on 2 CPU cores. A small
#: model trained this briefly and sampled with 10 Euler steps is imperfect on binding,
#: counting and position, which leaves RL its headroom (see docs/shapes-task.md).
BASE_STEPS = 4000

RECIPE = PretrainRecipe(
    "shapes",
    ShapesVelocityNet,
    scene_batch,
    tokenize,
    BASE_WEIGHTS,
    BASE_STEPS,
    batch_size=64,
    threads=2,
)
pretrain_base_model = RECIPE.train
pretrain = RECIPE.pretrain
