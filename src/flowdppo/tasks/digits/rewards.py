"""Rewards of the digits task: a digit classifier's probability, and a smoothness proxy.

``digit_prob``: softmax probability, under a small CNN trained on the train split, of the
digit the prompt names. ``digit_smoothness``: a prompt-free image-quality proxy that prefers
few, soft edges, ``clip(1 - 2 TV, 0, 1)`` with TV the mean absolute difference of neighbouring
pixels (real digits score ~0.52). It deliberately pulls against ``digit_prob`` (a blank image
scores 1) for multi-objective experiments.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowdppo.rewards import Reward, register_reward
from flowdppo.tasks.common import assets_dir, load_module
from flowdppo.tasks.digits.data import NUM_CLASSES, prompts_to_labels, to_model_scale
from flowdppo.tasks.digits.model import CLASSIFIER_WEIGHTS, DigitsAssetError

#: TV at which ``digit_smoothness`` reaches 0. Real digits have TV 0.20-0.27 (10th-90th
#: percentile), so they score 0.45-0.6; salt-and-pepper noise scores 0.
SMOOTHNESS_TV_ZERO = 0.5


class DigitClassifier(nn.Module):
    """A small CNN over 8x8 digits in [-1, 1]; returns logits [B, 10]."""

    def __init__(self, channels: int = 32, hidden: int = 128):
        super().__init__()
        self.config = {"channels": channels, "hidden": hidden}
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc = nn.Linear(2 * channels * 16, hidden)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        h = F.avg_pool2d(F.silu(self.conv2(h)), 2)
        return self.head(F.silu(self.fc(h.flatten(1))))


_CLASSIFIERS: dict[Path, DigitClassifier] = {}


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The reward classifier (shipped weights when ``path`` is None), loaded once per path."""
    path = (assets_dir() / CLASSIFIER_WEIGHTS if path is None else Path(path)).resolve()
    if path not in _CLASSIFIERS:
        net, _ = load_module(
            DigitClassifier, path, "digits reward classifier", "digits", DigitsAssetError
        )
        _CLASSIFIERS[path] = net.requires_grad_(False)
    return _CLASSIFIERS[path]


def make_digit_prob(classifier: DigitClassifier) -> Reward:
    """``digit_prob`` for a given classifier: p(prompted digit | image), images in [0, 1]."""

    @torch.no_grad()
    def digit_prob(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        labels = prompts_to_labels(prompts).to(images.device)
        net = classifier.to(images.device)
        probs = F.softmax(net(to_model_scale(images.float())), dim=1)
        return probs.gather(1, labels[:, None]).squeeze(1)

    return digit_prob


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontally and vertically neighbouring pixels, per image."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return (dx + dy) / 2


@torch.no_grad()
def digit_smoothness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``clip(1 - TV / SMOOTHNESS_TV_ZERO, 0, 1)``; ignores the prompts."""
    return (1 - total_variation(images.float()) / SMOOTHNESS_TV_ZERO).clamp(0, 1)


@register_reward("digit_prob")
def _make_digit_prob(classifier: str | None = None) -> Reward:
    """``classifier``: a classifier file written by ``flowdppo pretrain`` (default: the
    shipped one)."""
    return make_digit_prob(load_classifier(classifier))


@register_reward("digit_smoothness")
def _make_digit_smoothness() -> Reward:
    return digit_smoothness
