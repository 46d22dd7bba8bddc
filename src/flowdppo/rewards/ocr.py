"""``ocr``: how well an image renders the text its prompt asks for, read by a real OCR model.

The PP-OCRv4 text detector and recogniser that ship inside the ``rapidocr-onnxruntime``
wheel (``pip install -e ".[ocr]"``; nothing is downloaded at run time) read every text
line of an image; the lines, in reading order (top to bottom, left to right), are joined
with spaces into the recognised text. The reward is::

    1 - levenshtein(recognised, target) / max(len(recognised), len(target))

in [0, 1]: 1 for the exact text, 0 for nothing in common (and for nothing read at all).

**The target text** is what the prompt puts between double quotes, the convention of
Flow-GRPO's text-rendering prompts (``A neon sign that says "OPEN 24 HOURS"``); straight
and typographic quotes both count, several quoted parts are joined with spaces. A prompt
with no quoted text is handled by the ``unquoted`` option: ``prompt`` (default: the whole
prompt is the text to render, for prompt lists of bare words), ``nan`` (the sample is
left out of the iteration like any invalid reward, see ``reward.max_invalid_fraction``)
or ``error`` (the run stops, naming the prompt).

By default the comparison ignores case and whitespace (``ignore_case``,
``ignore_spaces``), as Flow-GRPO's does: a model is rewarded for the letters, not for a
font's case or the detector's word gaps.

Batching: every image is run through the detector on its own (images differ in size and
the detector takes one at a time), then the text lines of the whole batch go through the
recogniser together, in batches of ``batch_size`` lines. The models load once, when the
run builds the reward. ``max_side`` caps the detector's input (a larger image is shrunk
to it; PaddleOCR's own default is 960); ``threads`` sets onnxruntime's threads (default:
torch's, which ``train.threads`` sets). Videos are read frame by frame and averaged.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict

import numpy as np
import torch

from flowdppo.rewards import register_reward
from flowdppo.rewards.vision import as_frames

UNQUOTED = ("prompt", "nan", "error")
#: Images whose recognised text is remembered (for ``annotate``).
READ_CACHE = 4096
# "..." and the typographic “...”; an apostrophe inside a word must not open a quote, so
# single quotes are not used.
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def target_text(prompt: str, unquoted: str = "prompt") -> str | None:
    """The text a prompt asks to render (``None``: none, with ``unquoted="nan"``)."""
    parts = [
        a if a is not None and b == "" and a != "" else b or a for a, b in _QUOTED.findall(prompt)
    ]
    if parts:
        return " ".join(parts)
    if unquoted == "prompt":
        return prompt
    if unquoted == "nan":
        return None
    raise ValueError(
        f"reward 'ocr': prompt {prompt!r} has no quoted text to render; quote it "
        '(A sign that says "OPEN"), or set reward.options.ocr.unquoted to prompt or nan'
    )


def levenshtein(a: str, b: str) -> int:
    """Edits (insertions, deletions, substitutions) that turn ``a`` into ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_similarity(recognised: str, target: str) -> float:
    """1 - the normalised edit distance, in [0, 1] (two empty texts: 1)."""
    longest = max(len(recognised), len(target))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(recognised, target) / longest


class OcrReward:
    """``fn(images, prompts) -> Tensor[B]``; holds the loaded OCR models."""

    def __init__(
        self,
        *,
        unquoted: str = "prompt",
        ignore_case: bool = True,
        ignore_spaces: bool = True,
        min_confidence: float = 0.5,
        max_side: int = 960,
        batch_size: int = 16,
        threads: int | None = None,
    ):
        if unquoted not in UNQUOTED:
            raise ValueError(
                f"reward.options.ocr.unquoted must be one of {', '.join(UNQUOTED)}, got "
                f"{unquoted!r}"
            )
        if not 0 <= min_confidence <= 1 or max_side < 32 or batch_size < 1:
            raise ValueError(
                "reward 'ocr' needs 0 <= min_confidence <= 1, max_side >= 32 and batch_size >= 1"
            )
        if threads is not None and threads < 1:
            raise ValueError(f"reward.options.ocr.threads must be >= 1, got {threads}")
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise ValueError(
                "reward 'ocr' needs the OCR extra: pip install -e \".[ocr]\" (or pip install "
                f"rapidocr-onnxruntime); importing it failed: {exc}"
            ) from None
        n = threads or torch.get_num_threads()
        self.engine = RapidOCR(
            det_limit_side_len=max_side,
            det_limit_type="max",
            rec_batch_num=batch_size,
            intra_op_num_threads=n,
            inter_op_num_threads=1,
            text_score=min_confidence,
        )
        self.unquoted = unquoted
        self.ignore_case = ignore_case
        self.ignore_spaces = ignore_spaces
        self.min_confidence = min_confidence
        # The text read from recent images, by their pixels: ``annotate`` (the sample grid's
        # notes) shows what scoring read without running the models again.
        self._read_cache: OrderedDict[bytes, str] = OrderedDict()

    def _normalise(self, text: str) -> str:
        if self.ignore_spaces:
            text = "".join(text.split())
        return text.casefold() if self.ignore_case else text

    def read(self, images: torch.Tensor) -> list[str]:
        """The recognised text of every image [N, C, H, W] in [0, 1]."""
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        arr = arr.permute(0, 2, 3, 1).numpy()
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        keys = [
            hashlib.blake2b(img.tobytes() + bytes(str(img.shape), "ascii")).digest() for img in arr
        ]
        todo = [i for i, k in enumerate(keys) if k not in self._read_cache]
        crops: list[np.ndarray] = []
        owner: list[int] = []
        for i in todo:
            lines = self._detect(np.ascontiguousarray(arr[i][..., ::-1]))  # the models read BGR
            crops += lines
            owner += [i] * len(lines)
        texts: dict[int, list[str]] = {i: [] for i in todo}
        if crops:
            recognised, _ = self.engine.text_rec(crops)
            for i, (text, confidence) in zip(owner, recognised):
                if confidence >= self.min_confidence:
                    texts[i].append(text)
        for i in todo:
            self._read_cache[keys[i]] = " ".join(texts[i])
        out = [self._read_cache[k] for k in keys]
        for k in keys:
            self._read_cache.move_to_end(k)
        while len(self._read_cache) > READ_CACHE:
            self._read_cache.popitem(last=False)
        return out

    def annotate(self, images: torch.Tensor, prompts: list[str]) -> list[str]:
        """The text read from each sample (frames of a video joined with " | "): the notes
        of the sample grid. Images scored recently are not read again."""
        frames, f = as_frames(images)
        read = self.read(frames)
        return [" | ".join(read[i * f : (i + 1) * f]) for i in range(len(read) // f)]

    def _detect(self, img: np.ndarray) -> list[np.ndarray]:
        """The image's text lines as crops, in reading order (RapidOCR's own detection
        path, without its recogniser, which runs once for the batch)."""
        e = self.engine
        img, _, _ = e.preprocess(img)
        img, _ = e.maybe_add_letterbox(img, {})
        boxes, _ = e.auto_text_det(img)
        return [] if boxes is None else e.get_crop_img_list(img, boxes)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        frames, f = as_frames(images)
        if len(prompts) * f != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} samples")
        texts = [p for p in prompts for _ in range(f)]
        scores = self.score_texts(self.read(frames), texts)
        return torch.tensor(scores, dtype=torch.float32).view(-1, f).mean(1)

    def score_texts(self, read: list[str], prompts: list[str]) -> list[float]:
        """The reward of each recognised text against its prompt's target text."""
        scores = []
        for text, prompt in zip(read, prompts, strict=True):
            target = target_text(prompt, self.unquoted)
            if target is None:
                scores.append(float("nan"))
            else:
                scores.append(text_similarity(self._normalise(text), self._normalise(target)))
        return scores


# The class is the factory: its keyword arguments are the options.
register_reward("ocr")(OcrReward)
