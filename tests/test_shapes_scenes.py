"""Shapes task scene generator: valid, non-overlapping, deterministic layouts."""

import numpy as np
import pytest
import torch

from flowdppo.tasks.shapes import grammar, scenes
from flowdppo.tasks.shapes.scenes import (
    GAP,
    IMAGE_SIZE,
    PALETTE,
    layout,
    relation_holds,
    render,
    sample_scene,
    scene_batch,
    shape_mask,
)


def _all_specs():
    return [grammar.parse_prompt(p) for s in grammar.SKILLS for p in grammar.skill_prompts(s)]


def test_masks_fill_their_box():
    for shape in grammar.SHAPES:
        for size in scenes.OBJECT_SIZES:
            m = shape_mask(shape, size)
            assert m.shape == (size, size)
            # Every mask touches all four sides, so the detected box is the drawn box.
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
    assert shape_mask("square", 5).all()
    assert shape_mask("triangle", 7)[0].sum() == 1 and shape_mask("triangle", 7)[-1].all()


def test_layouts_are_valid_for_every_caption():
    rng = np.random.default_rng(0)
    for spec in _all_specs():
        objs = layout(spec, rng)
        wanted = sorted((g.shape, g.colour) for g in spec.groups for _ in range(g.count))
        assert sorted((o.shape, o.colour) for o in objs) == wanted
        for i, a in enumerate(objs):
            x0, y0, x1, y1 = a.box
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
            for b in objs[i + 1 :]:
                bx0, by0, bx1, by1 = b.box
                # No overlap, and at least GAP empty pixels between the boxes.
                assert x1 + GAP <= bx0 or bx1 + GAP <= x0 or y1 + GAP <= by0 or by1 + GAP <= y0
        if spec.relation:
            assert relation_holds(objs[0].box, objs[1].box, spec.relation)
            assert relation_holds(objs[0].box, objs[1].box, spec.relation, 0.8)


def test_render_range_colours_and_counts():
    objs, img = sample_scene("three blue triangles", seed=3)
    assert img.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and img.dtype == np.float32
    assert img.min() == 0.0 and img.max() == 1.0
    assert len(objs) == 3
    on = img.max(0) > 0
    assert on.sum() == sum(shape_mask(o.shape, o.size).sum() for o in objs)
    assert np.allclose(img[:, on].T, PALETTE["blue"])


def test_determinism():
    a_objs, a = sample_scene("a red square left of a blue circle", seed=7)
    b_objs, b = sample_scene("a red square left of a blue circle", seed=7)
    assert a_objs == b_objs and np.array_equal(a, b)
    _, c = sample_scene("a red square left of a blue circle", seed=8)
    assert not np.array_equal(a, c)
    x1, cap1 = scene_batch(16, np.random.default_rng(1))
    x2, cap2 = scene_batch(16, np.random.default_rng(1))
    assert cap1 == cap2 and torch.equal(x1, x2)
    assert x1.shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE) and x1.min() == -1 and x1.max() == 1
    assert np.array_equal(render([]), np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), np.float32))


def test_random_specs_cover_every_skill():
    rng = np.random.default_rng(0)
    skills = {scenes.random_spec(rng).skill for _ in range(200)}
    assert skills == set(grammar.SKILLS)


@pytest.mark.parametrize(
    ("a", "b", "holds"),
    [
        ((0, 5, 5, 10), (9, 5, 14, 10), {"left of"}),
        ((9, 5, 14, 10), (0, 5, 5, 10), {"right of"}),
        ((5, 0, 10, 5), (5, 9, 10, 14), {"above"}),
        ((0, 0, 5, 5), (9, 9, 14, 14), {"left of", "above"}),  # diagonal: both, as GenEval
        ((0, 0, 5, 5), (1, 0, 6, 5), set()),  # too close to tell
    ],
)
def test_relations(a, b, holds):
    assert {r for r in grammar.RELATIONS if relation_holds(a, b, r)} == holds
