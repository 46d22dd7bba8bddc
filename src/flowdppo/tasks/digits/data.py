"""The digits data (scikit-learn's bundled 8x8 handwritten digits) and the prompt vocabulary."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
#: Prompts RL trains on.
TRAIN_PROMPTS: list[str] = list(DIGIT_NAMES[:7])
#: Prompts RL never trains on: the base model knows them, so drift on them measures forgetting.
HELDOUT_PROMPTS: list[str] = list(DIGIT_NAMES[7:])
NUM_CLASSES = 10
#: The "no label" class of the base model, used for classifier-free guidance.
NULL_LABEL = 10
IMAGE_SHAPE = (1, 8, 8)


class DigitsData(NamedTuple):
    """Images in [-1, 1], shape [N, 1, 8, 8] (float32), and their labels (int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_heldout: torch.Tensor
    y_heldout: torch.Tensor


def prompt_to_label(prompt: str) -> int:
    """The digit a prompt names ("three" -> 3); case and surrounding spaces are ignored."""
    key = prompt.strip().lower() if isinstance(prompt, str) else prompt
    try:
        return DIGIT_NAMES.index(key)
    except ValueError:
        raise ValueError(
            f"unknown digits prompt {prompt!r}; the digits task knows: {', '.join(DIGIT_NAMES)}"
        ) from None


def prompts_to_labels(prompts: Sequence[str]) -> torch.Tensor:
    """Labels of a batch of prompts, as a LongTensor [B]."""
    return torch.tensor([prompt_to_label(p) for p in prompts], dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    # Imported here: scikit-learn takes about a second to import and only pretraining,
    # tests and evaluation need the data.
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def to_model_scale(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (as ``decode`` returns them) to the data scale [-1, 1]."""
    return images01 * 2 - 1


def load_digits_split(seed: int = 0, heldout_fraction: float = 0.2) -> DigitsData:
    """All 1,797 digits, split into a stratified train / held-out part (fixed by ``seed``).

    Pixel values 0..16 are mapped linearly to [-1, 1]. Both the base model and the reward
    classifier are trained on the train part only; the held-out part measures the classifier.
    """
    from sklearn.model_selection import train_test_split

    images, labels = _raw()
    idx_train, idx_held = train_test_split(
        np.arange(len(labels)),
        test_size=heldout_fraction,
        random_state=seed,
        stratify=labels,
    )
    # Sorted so that the split is a set, independent of scikit-learn's shuffling order.
    idx_train, idx_held = np.sort(idx_train), np.sort(idx_held)
    x = torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1)
    y = torch.from_numpy(labels)
    return DigitsData(
        x[idx_train].clone(), y[idx_train].clone(), x[idx_held].clone(), y[idx_held].clone()
    )
