"""The ``ocr`` reward with its real shipped PP-OCR models, on words rendered with PIL."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowdppo.rewards import get_reward
from flowdppo.rewards.ocr import levenshtein, target_text, text_similarity

pytestmark = pytest.mark.usefixtures("one_thread")

# Near neighbours on purpose (house / horse, cat / cart): the reward must tell them apart.
WORDS = [
    "house", "horse", "cat", "cart", "garden", "matrix", "sunset", "quartz",
    "OCEAN", "River", "bridge", "Flow", "lantern", "pixel", "Harbor", "velvet",
    "copper", "meadow", "zebra", "window", "jungle", "OPEN 24", "tiger", "violin",
]  # fmt: skip


def render(word: str, size: tuple[int, int] = (224, 96), seed: int = 0) -> torch.Tensor:
    """Dark text on a light background at a position drawn from ``seed``, as [3, H, W]."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=30)
    x, y = int(rng.integers(4, 20)), int(rng.integers(10, 40))
    draw.text((x, y), word, fill=tuple(int(v) for v in rng.integers(0, 60, 3)), font=font)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip(
        "rapidocr_onnxruntime", reason='the [ocr] extra is not installed (pip install -e ".[ocr]")'
    )
    return get_reward("ocr")


@pytest.fixture(scope="module")
def rendered():
    return torch.stack([render(w, seed=i) for i, w in enumerate(WORDS)])


def test_the_right_word_scores_near_one_and_above_every_wrong_word(ocr, rendered):
    prompts = [f'a poster with the word "{w}" on it' for w in WORDS]
    right = ocr(rendered, prompts)
    assert right.shape == (len(WORDS),) and right.dtype == torch.float32
    assert (right >= 0.8).all(), dict(zip(WORDS, right.tolist()))
    assert right.mean() >= 0.95
    # Every image against every wrong word, from the same reading.
    read = ocr.read(rendered)
    for i, word in enumerate(WORDS):
        wrong = ocr.score_texts(
            [read[i]] * (len(WORDS) - 1), [f'"{w}"' for w in WORDS if w != word]
        )
        assert right[i] > max(wrong), (word, read[i])
    # End to end, a wrong assignment is clearly lower.
    shifted = ocr(rendered[:8], prompts[1:8] + prompts[:1])
    assert shifted.mean() < right[:8].mean() - 0.4


def test_a_run_without_ocr_never_imports_rapidocr():
    code = (
        "import sys; from flowdppo.rewards import available_rewards, get_reward; "
        "import flowdppo.rewards.ocr; available_rewards(); get_reward('digit_prob'); "
        "assert 'rapidocr_onnxruntime' not in sys.modules and 'cv2' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_ocr_is_deterministic_and_scores_videos_per_frame(ocr, rendered):
    frames = rendered[:4]
    prompts = [f'"{w}"' for w in WORDS[:2]]
    video = torch.stack([frames[:2], frames[2:]]).permute(0, 2, 1, 3, 4)  # [2, 3, F=2, H, W]
    first, second = ocr(video, prompts), ocr(video, prompts)
    assert torch.equal(first, second)
    per_frame = torch.tensor(ocr.score_texts(ocr.read(frames), [prompts[0]] * 2 + [prompts[1]] * 2))
    assert torch.allclose(first, per_frame.view(2, 2).mean(1))
    assert first[0] > first[1]  # the second video shows other words than its prompt's


def test_blank_image_reads_nothing_and_scores_zero(ocr):
    blank = torch.ones(1, 3, 64, 128)
    assert ocr.read(blank) == [""]
    assert ocr(blank, ['"hello"']).item() == 0.0


def test_target_text_follows_the_quote_convention():
    assert target_text('A neon sign that says "OPEN 24 HOURS"') == "OPEN 24 HOURS"
    assert target_text('A sign saying \u201cHello\u201d and "World"') == "Hello World"
    assert target_text("the baker's shop") == "the baker's shop"  # no quotes: the prompt
    assert target_text("the baker's shop", unquoted="nan") is None
    with pytest.raises(ValueError, match="has no quoted text"):
        target_text("a cat", unquoted="error")
    assert target_text('an empty sign ""') == ""


def test_normalised_edit_distance():
    assert levenshtein("kitten", "sitting") == 3
    assert text_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert text_similarity("", "") == 1.0 and text_similarity("", "abc") == 0.0
    assert text_similarity("abc", "abc") == 1.0


def test_unquoted_nan_leaves_the_sample_out(ocr, rendered):
    reward = get_reward("ocr", unquoted="nan")
    out = reward(rendered[:2], ['"house"', "no quotes here"])
    assert out[0] > 0.8 and math.isnan(out[1])


def test_bad_options_are_refused_with_the_key():
    pytest.importorskip("rapidocr_onnxruntime", reason="the [ocr] extra is not installed")
    with pytest.raises(ValueError, match="reward.options.ocr.unquoted must be one of"):
        get_reward("ocr", unquoted="skip")
    with pytest.raises(ValueError, match="does not take the options"):
        get_reward("ocr", langauge="en")
