"""Shapes task detector and rewards: exact on clean renders, failing corrupted scenes."""

import dataclasses

import numpy as np
import pytest
import torch

from flowdppo.rewards import get_reward
from flowdppo.tasks import shapes  # noqa: F401  (registers the task and its rewards)
from flowdppo.tasks.shapes import detect as D
from flowdppo.tasks.shapes import grammar
from flowdppo.tasks.shapes.scenes import layout, render

ALL_PROMPTS = [p for s in grammar.SKILLS for p in grammar.skill_prompts(s)]


def _images(scenes_):
    return torch.from_numpy(np.stack([render(o) for o in scenes_]))


def _clean(prompts, seed=0):
    rng = np.random.default_rng(seed)
    return [layout(grammar.parse_prompt(p), rng) for p in prompts]


def test_clean_renders_score_perfectly_for_every_caption():
    prompts = ALL_PROMPTS * 2
    checks = D.check_images(_images(_clean(prompts)), prompts)
    failures = [c for c in checks if not c.strict]
    assert failures == []
    summary = D.skill_summary(checks)
    assert summary["overall"]["strict"] == 1.0 and summary["overall"]["soft"] == 1.0
    assert set(summary) == set(grammar.SKILLS) | {"overall"}
    assert summary["position"]["position"] == 1.0 and summary["counting"]["count"] == 1.0


def test_detections_match_the_drawn_objects():
    objs = _clean(["a red square left of a blue circle"])[0]
    dets = D.detect_objects(_images([objs]))[0]
    assert sorted((d.shape, d.colour, d.box) for d in dets) == sorted(
        (o.shape, o.colour, o.box) for o in objs
    )


def test_light_noise_does_not_change_the_verdict():
    prompts = ALL_PROMPTS
    x = _images(_clean(prompts, seed=1))
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(
        0, 1
    )
    assert all(c.strict for c in D.check_images(noisy, prompts))


def _other(value, options):
    return next(o for o in options if o != value)


def _corruptions(prompt, objs):
    """(name, corrupted objects) pairs that must fail ``prompt``."""
    spec = grammar.parse_prompt(prompt)
    out = []
    first = objs[0]
    out.append(
        (
            "wrong colour",
            [dataclasses.replace(first, colour=_other(first.colour, grammar.COLOURS))] + objs[1:],
        )
    )
    out.append(
        (
            "wrong shape",
            [dataclasses.replace(first, shape=_other(first.shape, grammar.SHAPES))] + objs[1:],
        )
    )
    out.append(("missing object", objs[:-1]))
    if spec.relation:
        a, b = objs
        swapped = [
            dataclasses.replace(a, shape=b.shape, colour=b.colour),
            dataclasses.replace(b, shape=a.shape, colour=a.colour),
        ]
        out.append(("swapped position", swapped))
    if len(spec.groups) == 2 and spec.groups[0].colour != spec.groups[1].colour:
        a, b = objs
        out.append(
            (
                "colours swapped",
                [dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)],
            )
        )
    return out


def test_corrupted_scenes_fail():
    rng = np.random.default_rng(2)
    prompts, images, names = [], [], []
    for p in ALL_PROMPTS:
        objs = layout(grammar.parse_prompt(p), rng)
        for name, bad in _corruptions(p, objs):
            prompts.append(p)
            images.append(render(bad))
            names.append(name)
        # An extra object: lay out the caption plus one more object, keep the caption.
        spec = grammar.parse_prompt(p)
        if spec.n_objects < grammar.MAX_OBJECTS and spec.relation is None:
            shape = "square" if spec.groups[0].shape != "square" else "circle"
            more = grammar.PromptSpec(spec.groups + (grammar.ObjectGroup(shape, "red"),))
            prompts.append(p)
            images.append(render(layout(more, rng)))
            names.append("extra object")
    checks = D.check_images(torch.from_numpy(np.stack(images)), prompts)
    passed = [(n, c.prompt) for n, c in zip(names, checks) if c.strict]
    assert passed == []
    assert {
        "wrong colour",
        "wrong shape",
        "missing object",
        "swapped position",
        "colours swapped",
        "extra object",
    } <= set(names)
    # The soft score still gives partial credit.
    soft = torch.tensor([c.soft for c in checks])
    assert (soft > 0).float().mean() > 0.9 and soft.max() < 1


def test_counting_needs_the_exact_number():
    rng = np.random.default_rng(3)
    four = render(layout(grammar.parse_prompt("four green circles"), rng))
    two = render(layout(grammar.parse_prompt("two green circles"), rng))
    x = torch.from_numpy(np.stack([four, two, four]))
    checks = D.check_images(x, ["three green circles", "three green circles", "four green circles"])
    assert [c.strict for c in checks] == [False, False, True]
    assert checks[0].conditions["count[0]"] is False and checks[0].conditions["colour[0]"]


def test_speckle_and_blank_images():
    x = torch.zeros(2, 3, 16, 16)
    x[1, :, 3, 3] = torch.tensor([1.0, 0.1, 0.1])  # one red pixel: noise, not an object
    x[1, :, 9, 9:11] = torch.tensor([0.1, 0.1, 1.0])[:, None]
    assert D.detect_objects(x) == [[], []]
    checks = D.check_images(x, ["a red circle", "a red circle"])
    assert [c.soft for c in checks] == [0.0, 0.0]
    grey = torch.full((1, 3, 16, 16), 0.0)
    grey[0, :, 2:9, 2:9] = 0.8  # bright but unsaturated: an object of unknown colour
    (det,) = D.detect_objects(grey)[0]
    assert det.colour is None and det.shape == "square"


def test_rewards_registered_with_the_right_values():
    rng = np.random.default_rng(4)
    prompts = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
    good = _images(_clean(prompts, seed=4))
    wrong = torch.zeros_like(good)
    x = torch.cat([good, wrong])
    both = prompts * 2
    soft = get_reward("shapes_geneval")(x, both)
    strict = get_reward("shapes_strict")(x, both)
    assert soft.shape == strict.shape == (6,)
    assert soft.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert strict.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    half = torch.from_numpy(render(layout(grammar.parse_prompt("a red circle"), rng)))[None]
    # A red circle for "a red circle and a blue square": present[0], colour[0] of 5.
    assert get_reward("shapes_geneval")(
        half, ["a red circle and a blue square"]
    ).item() == pytest.approx(0.4)


def test_smoothness_pulls_against_the_object_reward():
    smooth = get_reward("shapes_smoothness")
    prompts = ["four red squares"] * 2
    scene = _images(_clean(prompts[:1]))
    blank = torch.zeros_like(scene)
    noise = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    s = smooth(torch.cat([blank, scene, noise]), prompts + prompts[:1])
    assert s[0] == 1.0 and 0.3 < s[1] < 1.0 and s[2] == 0.0
    # The blank image wins on smoothness and loses on the object reward.
    g = get_reward("shapes_geneval")(torch.cat([blank, scene]), prompts)
    assert g[0] < g[1]
