"""The built-in "text" task: visual text rendering, read by a real OCR model.

* prompts: ``a sign that says "river"``, one word in quotes; 48 trained and 24 held-out
  words of 3, 5 and 8 letters (:mod:`.words`); evaluation breaks the reward down by length;
* images: one grey channel at 32 x 128 pixels (d = 4,096 latent elements), dark text on a
  light background (:mod:`.rendering`);
* base model: a glyph- and letter-conditioned patch transformer flow model pretrained on
  words rendered with Pillow's own font in varied sizes, strokes and positions
  (``assets/text_base.safetensors``, :mod:`.model`, :mod:`.pretraining`);
* reward: ``ocr`` (:mod:`flowdppo.rewards.ocr`: the PP-OCR models inside the
  ``rapidocr-onnxruntime`` wheel, 1 - the normalised edit distance to the quoted word).

See ``docs/text-task.md``.
"""

from __future__ import annotations

from flowdppo.tasks import register_builtin_task
from flowdppo.tasks.blocks import LORA_TARGETS
from flowdppo.tasks.common import FAST_ROLLOUT
from flowdppo.tasks.text.model import (
    BASE_WEIGHTS,
    TextAssetError,
    TextModel,
    TextVelocityNet,
    glyphs,
    load_base_model,
)
from flowdppo.tasks.text.pretraining import pretrain, pretrain_base_model
from flowdppo.tasks.text.rendering import HEIGHT, WIDTH, Style, render, sample_style, word_batch
from flowdppo.tasks.text.words import (
    HELDOUT_PROMPTS,
    HELDOUT_WORDS,
    TRAIN_PROMPTS,
    TRAIN_WORDS,
    WordError,
    prompt_for,
    tokenize,
    word_of,
)

__all__ = [
    "BASE_WEIGHTS",
    "HEIGHT",
    "HELDOUT_PROMPTS",
    "HELDOUT_WORDS",
    "LORA_TARGETS",
    "TRAIN_PROMPTS",
    "TRAIN_WORDS",
    "WIDTH",
    "Style",
    "TextAssetError",
    "TextModel",
    "TextVelocityNet",
    "WordError",
    "glyphs",
    "length_group",
    "load_base_model",
    "pretrain",
    "pretrain_base_model",
    "prompt_for",
    "render",
    "sample_style",
    "tokenize",
    "word_batch",
    "word_of",
]


def length_group(prompt: str) -> str:
    """The evaluation group of a prompt: its word's length, ``len3``, ``len5``, ``len8``."""
    return f"len{len(word_of(prompt))}"


register_builtin_task(
    "text",
    __name__,
    default_rewards=["ocr"],
    description=(
        "visual text rendering: one quoted word as a 32x128 grey image from a small "
        "glyph-conditioned flow transformer; reward: a real OCR model's 1 - normalised "
        "edit distance"
    ),
    eval_group=length_group,
    # The cores other processes leave idle, as shapes (trainer/threads.py): the OCR reward
    # runs on as many threads as torch has when the run starts.
    threads="auto",
    recommended={
        "train": {"iterations": 40, "prompts_per_iteration": 8, "group_size": 8},
        "log": {"eval_every": 20, "checkpoint_every": 20, "eval_samples_per_prompt": 2},
    },
    # Methods with SDE steps: the fast rollout (tasks/common.py), evaluated with Euler.
    recommended_sde=FAST_ROLLOUT,
)
