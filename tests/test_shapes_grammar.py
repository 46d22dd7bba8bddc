"""Shapes task grammar: parsing every skill, errors, tokens and the prompt split."""

import pytest

from flowdppo.tasks.shapes import grammar
from flowdppo.tasks.shapes.grammar import (
    HELDOUT_PAIRS,
    HELDOUT_PROMPTS,
    SKILLS,
    TRAIN_PROMPTS,
    ObjectGroup,
    PromptError,
    PromptSpec,
    parse_prompt,
    skill_prompts,
    split_prompts,
    tokenize,
)


def test_parse_examples_of_every_skill():
    assert parse_prompt("a red circle") == PromptSpec((ObjectGroup("circle", "red"),))
    assert parse_prompt("three yellow triangles") == PromptSpec(
        (ObjectGroup("triangle", "yellow", 3),)
    )
    two = parse_prompt("a blue square and a blue circle")
    assert two.skill == "two_object" and two.n_objects == 2 and two.relation is None
    attr = parse_prompt("a blue square and a green circle")
    assert attr.skill == "colour_attr"
    assert attr.groups == (ObjectGroup("square", "blue"), ObjectGroup("circle", "green"))
    pos = parse_prompt("A red square  left of a blue circle ")
    assert pos.skill == "position" and pos.relation == "left of"
    assert pos.groups == (ObjectGroup("square", "red"), ObjectGroup("circle", "blue"))
    assert parse_prompt("a green circle below a red triangle").relation == "below"


@pytest.mark.parametrize("skill", SKILLS)
def test_round_trip_every_prompt(skill):
    prompts = skill_prompts(skill)
    assert len(prompts) == len(set(prompts)) > 0
    for p in prompts:
        spec = parse_prompt(p)
        assert spec.caption() == p
        assert spec.skill == skill
        assert parse_prompt(spec.caption()) == spec
        assert 1 <= spec.n_objects <= grammar.MAX_OBJECTS


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a purple circle", "unknown colour 'purple'"),
        ("a red hexagon", "unknown shape 'hexagon'"),
        ("two red circle", "disagree in number"),
        ("five red circles", "not a number word"),
        ("a red circle and two blue squares", "counts above one"),
        ("a red circle and a red circle", "two red circles"),
        ("red circle", "cannot parse"),
        ("", "cannot parse"),
    ],
)
def test_parse_errors_say_what_is_wrong(text, match):
    with pytest.raises(PromptError, match=match):
        parse_prompt(text)


def test_tokenize_pads_and_null_caption():
    ids = tokenize(["a red square left of a blue circle", "a red circle", ""])
    assert all(len(row) == grammar.MAX_TOKENS for row in ids)
    assert grammar.PAD_ID not in ids[0]
    assert ids[1][3:] == [grammar.PAD_ID] * 5
    assert ids[2] == [grammar.NULL_ID] + [grammar.PAD_ID] * 7
    assert tokenize(["a red circle"], null=[True]) == [ids[2]]
    with pytest.raises(PromptError, match="'purple'.*not in the shapes vocabulary"):
        tokenize(["a purple circle"])


def test_split_is_disjoint_deterministic_and_holds_out_pairs():
    assert not set(TRAIN_PROMPTS) & set(HELDOUT_PROMPTS)
    assert len(TRAIN_PROMPTS) == len(set(TRAIN_PROMPTS)) == 93
    assert len(HELDOUT_PROMPTS) == len(set(HELDOUT_PROMPTS)) == 48
    held = set(HELDOUT_PAIRS)
    for p in TRAIN_PROMPTS:
        assert not parse_prompt(p).pairs() & held
    for p in HELDOUT_PROMPTS:
        assert parse_prompt(p).pairs() & held
    # Every colour and every shape still appears in training; only the pairs are new.
    seen = set().union(*(parse_prompt(p).pairs() for p in TRAIN_PROMPTS))
    assert {c for c, _ in seen} == set(grammar.COLOURS)
    assert {s for _, s in seen} == set(grammar.SHAPES)
    for skill in SKILLS:
        full = split_prompts(skill, "train") + split_prompts(skill, "heldout")
        assert sorted(full) == sorted(skill_prompts(skill))
        assert split_prompts(skill, "train", 24) == split_prompts(skill, "train", 24)
    skills = [parse_prompt(p).skill for p in TRAIN_PROMPTS]
    assert {s: skills.count(s) for s in SKILLS} == {
        "single_object": 9,
        "two_object": 12,
        "counting": 24,
        "colour_attr": 24,
        "position": 24,
    }
    assert TRAIN_PROMPTS[:3] == ["a red circle", "a red square", "a red triangle"]
