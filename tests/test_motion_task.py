"""The motion task: grammar, clips, the exact frame-by-frame reward and its corruptions, prompt
files refused before any work, the shipped base model and a short training run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdppo.config import ConfigError, load_config
from flowdppo.tasks import task_for_config
from flowdppo.tasks.motion import clips as clip_mod
from flowdppo.tasks.motion.clips import (
    CLIP_SHAPE,
    FRAME_SIZE,
    FRAMES,
    SPEED_PIXELS,
    Track,
    clip_batch,
    layout,
    random_spec,
    render_clip,
    sample_clip,
)
from flowdppo.tasks.motion.grammar import (
    HELDOUT_PAIRS,
    HELDOUT_PROMPTS,
    MAX_TOKENS,
    NULL_ID,
    PAD_ID,
    TRAIN_PROMPTS,
    MotionSpec,
    MovingObject,
    PromptError,
    is_heldout,
    parse_prompt,
    tokenize,
)
from flowdppo.tasks.motion.score import MotionReward, check_clips, summary
from flowdppo.tasks.shapes.grammar import COLOURS

pytestmark = pytest.mark.usefixtures("one_thread")

# --- grammar ---------------------------------------------------------------------------------


def test_parse_examples_and_round_trip():
    assert parse_prompt("a red square moving left") == MotionSpec(
        (MovingObject("square", "red", "left"),)
    )
    small = parse_prompt("A small yellow circle  moving down fast")
    assert small.objects == (MovingObject("circle", "yellow", "down", "small", "fast"),)
    assert small.caption() == "a small yellow circle moving down fast"
    two = parse_prompt("a blue circle moving up and a green triangle moving right")
    assert two.group == "two" and [o.direction for o in two.objects] == ["up", "right"]
    for p in TRAIN_PROMPTS + HELDOUT_PROMPTS:
        assert parse_prompt(p).caption() == p


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("a red hexagon moving left", "hexagon"),
        ("a purple square moving left", "purple"),
        ("a red square moving sideways", "sideways"),
        ("a red square moving left quickly", "quickly"),
        ("the red square moving left", "the"),
        ("a red square moving left and a red square moving up", "square"),
        ("a red square moving left and a blue circle moving up and a red circle moving up", "and"),
        ("a red square going left", "going"),
    ],
)
def test_parse_errors_name_the_word(text, word):
    with pytest.raises(PromptError, match=f"'{word}' is not understood") as err:
        parse_prompt(text)
    assert err.value.word == word and err.value.prompt == text
    assert "\n" not in str(err.value)


def test_parse_error_at_the_end():
    with pytest.raises(PromptError, match="ends early: expected a direction"):
        parse_prompt("a red square moving")


def test_tokens_split_and_groups():
    ids = tokenize(["a small red square moving left fast and a large blue circle moving up slowly"])
    assert len(ids[0]) == MAX_TOKENS and PAD_ID not in ids[0]
    assert tokenize([""]) == [[NULL_ID] + [PAD_ID] * (MAX_TOKENS - 1)]
    assert tokenize(["a red square moving left"], null=[True]) == tokenize([""])
    assert not set(TRAIN_PROMPTS) & set(HELDOUT_PROMPTS)
    assert len(set(TRAIN_PROMPTS)) == 48 and len(set(HELDOUT_PROMPTS)) == 24
    assert all(is_heldout(p) for p in HELDOUT_PROMPTS)
    assert not any(is_heldout(p) for p in TRAIN_PROMPTS)
    assert [parse_prompt(p).group for p in TRAIN_PROMPTS[:4]] == ["one", "two", "one", "two"]
    # Every shape and every direction is still trained on; only the held-out pairs are new.
    trained = {o.pair for p in TRAIN_PROMPTS for o in parse_prompt(p).objects}
    assert not trained & set(HELDOUT_PAIRS)
    assert {s for s, _ in trained} == {"circle", "square", "triangle"}
    assert {d for _, d in trained} == {"left", "right", "up", "down"}


def test_prompt_files_parse_before_any_work(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a red square moving left\n\n a small blue circle moving up fast \n")
    cfg = load_config(None, ["task=motion", f"data.train_prompts={good}"])
    task = task_for_config(cfg)
    assert task.train_prompts == ["a red square moving left", "a small blue circle moving up fast"]
    assert task.heldout_prompts == HELDOUT_PROMPTS
    bad = tmp_path / "bad.txt"
    bad.write_text("a red square moving left\n\na red square moving sideways\n")
    for key in ("train_prompts", "heldout_prompts"):
        cfg = load_config(None, ["task=motion", f"data.{key}={bad}"])
        with pytest.raises(ConfigError) as err:
            task_for_config(cfg)
        line = str(err.value)
        assert "\n" not in line
        assert line.startswith(f"data.{key}: {bad} line 3: 'a red square moving sideways'")
        assert "'sideways' is not understood: expected a direction" in line
    cfg = load_config(None, ["task=digits", f"data.train_prompts={good}"])
    with pytest.raises(ConfigError, match="task 'digits' has no prompt grammar"):
        task_for_config(cfg)


def test_cli_refuses_a_bad_prompt_file_with_one_line(tmp_path, capsys):
    from flowdppo.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_text("a green triangle moving right\na green triangel moving right\n")
    run = tmp_path / "run"
    code = main(["train", "--task", "motion", f"data.train_prompts={bad}", f"log.run_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "line 2" in err and "'triangel' is not understood" in err
    assert not run.exists()


# --- clips ------------------------------------------------------------------------------------


def test_clips_are_deterministic_and_in_frame():
    tracks, clip = sample_clip("a large red square moving right fast", seed=3)
    assert clip.shape == CLIP_SHAPE and np.prod(CLIP_SHAPE) >= 6144
    assert np.array_equal(clip, sample_clip("a large red square moving right fast", seed=3)[1])
    (tr,) = tracks
    assert (tr.size, tr.dx, tr.dy) == (7, SPEED_PIXELS["fast"], 0)
    assert tr.x >= 0 and tr.x + tr.size + 2 * (FRAMES - 1) <= FRAME_SIZE
    batch, captions = clip_batch(6, np.random.default_rng(0))
    assert batch.shape == (6, *CLIP_SHAPE) and batch.min() == -1 and len(captions) == 6


# --- the reward -------------------------------------------------------------------------------


def _ground_truth(n: int, seed: int):
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng) for _ in range(n)]
    tracks = [layout(s, rng) for s in specs]
    return specs, tracks


def test_ground_truth_scores_one_on_random_prompts():
    specs, tracks = _ground_truth(300, seed=0)
    clips = torch.from_numpy(np.stack([render_clip(t) for t in tracks]))
    prompts = [s.caption() for s in specs]
    checks = check_clips(clips, prompts)
    assert all(c.strict for c in checks), [c for c in checks if not c.strict][:3]
    assert MotionReward()(clips[:32], prompts[:32]).tolist() == [1.0] * 32
    assert MotionReward(strict=True)(clips[:32], prompts[:32]).tolist() == [1.0] * 32
    table = summary(checks)
    assert table["all"]["strict"] == 1.0 and table["one"]["n"] + table["two"]["n"] == 300
    assert {"colour", "shape", "size", "direction", "speed", "count"} <= set(table["all"])


def _free_spot(tracks: list[Track], size: int) -> Track | None:
    """A still object of ``size`` that no track comes near in any frame."""
    for y in range(0, FRAME_SIZE - size + 1, 2):
        for x in range(0, FRAME_SIZE - size + 1, 2):
            extra = Track("square", "yellow", size, x, y, 0, 0)
            if all(clip_mod._separated(extra, t, FRAMES) for t in tracks):
                return extra
    return None


def _corrupt(kind: str, spec: MotionSpec, tracks: list[Track], rng: np.random.Generator):
    clip = render_clip(tracks)
    if kind == "reversed":
        return clip[:, ::-1].copy()
    if kind == "frozen":
        k = int(rng.integers(1, FRAMES))
        clip[:, k] = clip[:, k - 1]
        return clip
    if kind == "shuffled":
        order = np.arange(FRAMES)
        while (order == np.arange(FRAMES)).all():
            order = rng.permutation(FRAMES)
        return clip[:, order].copy()
    if kind == "colour_change":
        i, k = int(rng.integers(len(tracks))), int(rng.integers(1, FRAMES))
        t = tracks[i]
        other = [c for c in COLOURS if c != t.colour][int(rng.integers(3))]
        changed = Track(t.shape, other, t.size, t.x, t.y, t.dx, t.dy)
        late = render_clip([changed if j == i else u for j, u in enumerate(tracks)])
        clip[:, k:] = late[:, k:]
        return clip
    if kind == "extra":
        extra = _free_spot(tracks, 5)
        return None if extra is None else render_clip([*tracks, extra])
    if kind == "missing":
        i = int(rng.integers(len(tracks)))
        return render_clip([t for j, t in enumerate(tracks) if j != i])
    if kind == "wrong_speed":
        # Only captions that ask for a speed: without a speed word either speed is right.
        if any(o.speed is None for o in spec.objects):
            return None
        wrong = tuple(
            SPEED_PIXELS["fast" if o.speed == "slowly" else "slowly"] for o in spec.objects
        )
        return render_clip(layout(spec, rng, speeds=wrong))
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    ["reversed", "wrong_speed", "frozen", "shuffled", "colour_change", "extra", "missing"],
)
def test_every_corruption_fails(kind):
    specs, tracks = _ground_truth(240 if kind == "wrong_speed" else 60, seed=1)
    rng = np.random.default_rng(2)
    rows = [(s, _corrupt(kind, s, t, rng)) for s, t in zip(specs, tracks)]
    rows = [(s, c) for s, c in rows if c is not None]
    assert len(rows) >= 30
    clips = torch.from_numpy(np.stack([c for _, c in rows]))
    prompts = [s.caption() for s, _ in rows]
    checks = check_clips(clips, prompts)
    passed = [c.prompt for c in checks if c.strict]
    assert not passed, passed[:3]
    assert all(0 <= c.soft < 1 for c in checks)
    expected_failure = {
        "reversed": "direction",
        "wrong_speed": "speed",
        "frozen": "speed",
        "shuffled": "speed",
        "colour_change": "colour",
        "extra": "count",
        "missing": "count",
    }[kind]
    assert all(c.attribute(expected_failure) < 1 for c in checks)


def test_components_report_each_attribute():
    specs, tracks = _ground_truth(8, seed=4)
    clips = torch.from_numpy(np.stack([render_clip(t) for t in tracks]))
    prompts = [s.caption() for s in specs]
    parts = MotionReward().components(clips, prompts)
    assert set(parts) == {"colour", "shape", "size", "direction", "speed", "count"}
    for kind, values in parts.items():
        asked = torch.isfinite(values)
        assert (values[asked] == 1).all(), kind
    has_size = [any(o.size for o in s.objects) for s in specs]
    assert torch.isfinite(parts["size"]).tolist() == has_size
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        MotionReward()(clips[:, :, 0], prompts)


# --- the shipped base model and a short run ---------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from flowdppo.tasks.motion import load_base_model

    return load_base_model()


def test_shipped_base_model(model):
    from flowdppo.tasks.common import assets_dir, euler_sample
    from flowdppo.tasks.motion import MotionModel
    from flowdppo.tasks.motion.model import BASE_WEIGHTS

    assert isinstance(model, MotionModel) and model.image_shape == CLIP_SHAPE
    assert sum(p.numel() for p in model.module.parameters()) < 1_000_000

    meta = json.loads((assets_dir() / BASE_WEIGHTS).with_suffix(".json").read_text())
    assert meta["config"]["patch"][0] > 1 and meta["seed"] == 0
    prompts = TRAIN_PROMPTS[:4]
    clips = euler_sample(model, prompts, 10, 1.0, torch.Generator().manual_seed(0))
    assert clips.shape == (4, *CLIP_SHAPE) and 0 <= clips.min() and clips.max() <= 1
    with torch.no_grad():
        x = model.initial_noise(2, torch.Generator().manual_seed(1))
        v = model.velocity(x, torch.tensor([0.5, 0.5]), model.encode(prompts[:2]), 3.0)
    assert torch.isfinite(v).all() and v.shape == x.shape


def test_missing_weights_say_how_to_make_them(tmp_path):
    from flowdppo.tasks.motion import MotionAssetError, load_base_model

    with pytest.raises(MotionAssetError, match="flowdppo pretrain --task motion"):
        load_base_model(tmp_path / "none.safetensors")


def test_short_training_run_logs_attributes_groups_and_videos(tmp_path):
    from flowdppo.trainer.loop import Trainer

    run = tmp_path / "run"
    cfg = load_config(
        str(Path(__file__).parents[1] / "configs" / "motion" / "dppo.yaml"),
        [
            "train.iterations=2",
            "train.prompts_per_iteration=2",
            "train.group_size=4",
            "train.minibatch_size=8",
            "log.eval_every=2",
            "log.eval_prompts=2",
            "log.eval_samples_per_prompt=2",
            f"log.run_dir={run}",
            "log.tensorboard=false",
        ],
    )
    Trainer(cfg, run).train()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    for split in ("train", "heldout"):
        assert np.isfinite(last[f"eval/{split}/reward/mean"])
        for kind in ("colour", "shape", "direction", "speed", "count"):
            assert 0 <= last[f"eval/{split}/reward/motion/{kind}"] <= 1
        assert {f"eval/{split}/group/one/reward", f"eval/{split}/group/two/reward"} <= set(last)
    assert list((run / "grids").rglob("*.gif"))
