"""Seeded, reproducible pretraining of the text base model (CPU, one thread, about 6 minutes).

Every step renders a fresh batch of words (both word lists, as a foundation model would have
seen them) in random sizes, strokes and offsets and takes one rectified-flow step (the loop
and its recipe: :mod:`flowdppo.tasks.pretraining`, shared with the shapes task).
"""

from __future__ import annotations

import numpy as np
import torch

from flowdppo.tasks.pretraining import PretrainRecipe
from flowdppo.tasks.text.model import BASE_WEIGHTS, SHIFT, TextVelocityNet
from flowdppo.tasks.text.rendering import word_batch
from flowdppo.tasks.text.words import ALL_WORDS, prompt_for, tokenize

#: Pretraining length of the shipped base model (see docs/text-task.md for its scores).
BASE_STEPS = 1000


def prompt_batch(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """``n`` rendered words of both lists and their prompts."""
    images, words = word_batch(ALL_WORDS, n, rng)
    return images, [prompt_for(w) for w in words]


RECIPE = PretrainRecipe(
    "text",
    TextVelocityNet,
    prompt_batch,
    tokenize,
    BASE_WEIGHTS,
    BASE_STEPS,
    batch_size=32,
    # One thread: on 2 cores a second thread bought little, and on a machine whose other
    # core was busy it made each step twice as slow (0.82 s against 0.42 s); one thread also
    # gives the same bytes whatever the machine's core count.
    threads=1,
    sigma_shift=SHIFT,
)
pretrain_base_model = RECIPE.train
pretrain = RECIPE.pretrain
