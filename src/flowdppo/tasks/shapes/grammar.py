"""Prompt grammar of the shapes task: captions, their parser, tokeniser, skills and splits.

A caption describes every object of its scene, GenEval-style, in one of five skills:

* ``single_object``: "a red circle"
* ``two_object``:    "a blue square and a blue circle" (two shapes, one colour: no binding)
* ``counting``:      "three yellow triangles" (two to four objects)
* ``colour_attr``:   "a blue square and a green circle" (two colours to bind to two shapes)
* ``position``:      "a red square left of a blue circle" (left of, right of, above, below)

The split holds out three colour-shape pairs (:data:`HELDOUT_PAIRS`): every prompt that
mentions one of them is held out, every other prompt is a training prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SKILLS: tuple[str, ...] = ("single_object", "two_object", "counting", "colour_attr", "position")
#: At most this many objects fit a 16x16 scene without overlap.
MAX_OBJECTS = 4

#: Colour-shape pairs never seen in a training prompt: one per shape, so that every colour
#: and every shape still appears in training (only the combination is new).
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "triangle"),
    ("yellow", "square"),
    ("blue", "circle"),
)

#: Prompts per skill kept in the training / held-out lists (the full sets are uneven: 12
#: single-object prompts against 288 position prompts); the caps keep skills balanced and
#: the trainer's evaluation over all listed prompts affordable.
TRAIN_PER_SKILL = 24
HELDOUT_PER_SKILL = 12

PAD, NULL = "<pad>", "<null>"
#: Fixed word vocabulary; index 0 pads, index 1 is the null caption of classifier-free guidance.
VOCAB: tuple[str, ...] = (
    PAD,
    NULL,
    "a",
    "and",
    "two",
    "three",
    "four",
    "left",
    "right",
    "of",
    "above",
    "below",
    *COLOURS,
    *SHAPES,
    *PLURALS.values(),
)
TOKEN_IDS: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, NULL_ID = TOKEN_IDS[PAD], TOKEN_IDS[NULL]
#: Every caption of the grammar has at most 8 words ("a red square left of a blue circle").
MAX_TOKENS = 8


class PromptError(ValueError):
    """A caption outside the shapes grammar."""


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` objects of one shape and colour."""

    shape: str
    colour: str
    count: int = 1

    def phrase(self) -> str:
        if self.count == 1:
            return f"a {self.colour} {self.shape}"
        return f"{NUMBER_WORDS[self.count]} {self.colour} {PLURALS[self.shape]}"


@dataclass(frozen=True)
class PromptSpec:
    """A parsed caption: one or two object groups and, for ``position``, a relation.

    ``relation`` reads "groups[0] <relation> groups[1]".
    """

    groups: tuple[ObjectGroup, ...]
    relation: str | None = None

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def skill(self) -> str:
        if self.relation is not None:
            return "position"
        if len(self.groups) == 1:
            return "single_object" if self.groups[0].count == 1 else "counting"
        return "two_object" if self.groups[0].colour == self.groups[1].colour else "colour_attr"

    def caption(self) -> str:
        joiner = f" {self.relation} " if self.relation else " and "
        return joiner.join(g.phrase() for g in self.groups)

    def pairs(self) -> set[tuple[str, str]]:
        """The (colour, shape) pairs the caption mentions."""
        return {(g.colour, g.shape) for g in self.groups}


_EXAMPLES = (
    "'a red circle', 'three yellow triangles', 'a blue square and a green circle', "
    "'a red square left of a blue circle'"
)


def _parse_group(words: list[str], text: str) -> ObjectGroup:
    if len(words) != 3:
        raise PromptError(
            f"cannot parse {' '.join(words)!r} in {text!r} as '<a|two|three|four> <colour> "
            f"<shape>'; captions look like {_EXAMPLES}"
        )
    number, colour, noun = words
    counts = {w: n for n, w in NUMBER_WORDS.items()}
    if number not in counts:
        raise PromptError(f"{number!r} in {text!r} is not a number word: use a, two, three, four")
    count = counts[number]
    if colour not in COLOURS:
        raise PromptError(f"unknown colour {colour!r} in {text!r}; colours: {', '.join(COLOURS)}")
    singular = {PLURALS[s]: s for s in SHAPES}
    if count == 1 and noun in SHAPES:
        shape = noun
    elif count > 1 and noun in singular:
        shape = singular[noun]
    elif noun in SHAPES or noun in singular:
        raise PromptError(f"{number!r} and {noun!r} disagree in number in {text!r}")
    else:
        raise PromptError(f"unknown shape {noun!r} in {text!r}; shapes: {', '.join(SHAPES)}")
    return ObjectGroup(shape, colour, count)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a caption of the grammar into a :class:`PromptSpec` (raises :class:`PromptError`)."""
    words = text.lower().split()
    relation = None
    for rel in RELATIONS:
        rw = rel.split()
        hits = [i for i in range(len(words)) if words[i : i + len(rw)] == rw]
        if hits:
            i = hits[0]
            relation, parts = rel, [words[:i], words[i + len(rw) :]]
            break
    else:
        if "and" in words:
            i = words.index("and")
            parts = [words[:i], words[i + 1 :]]
        else:
            parts = [words]
    groups = tuple(_parse_group(p, text) for p in parts)
    if len(groups) == 2:
        if any(g.count > 1 for g in groups):
            raise PromptError(
                f"{text!r}: counts above one are only supported alone, as in 'three red circles'"
            )
        if groups[0] == groups[1]:
            g = groups[0]
            raise PromptError(
                f"{text!r} names the same object twice; say 'two {g.colour} {PLURALS[g.shape]}'"
            )
    return PromptSpec(groups, relation)


def tokenize(prompts: list[str], null: list[bool] | None = None) -> list[list[int]]:
    """Word ids of each caption, right-padded to :data:`MAX_TOKENS`.

    An empty caption (or ``null[i]``) is the null caption of classifier-free guidance.
    """
    out = []
    for i, text in enumerate(prompts):
        words = text.lower().split()
        if (null is not None and null[i]) or not words:
            ids = [NULL_ID]
        else:
            unknown = [w for w in words if w not in TOKEN_IDS or w in (PAD, NULL)]
            if unknown:
                raise PromptError(
                    f"words {unknown} of {text!r} are not in the shapes vocabulary "
                    f"({', '.join(VOCAB[2:])}); captions look like {_EXAMPLES}"
                )
            if len(words) > MAX_TOKENS:
                raise PromptError(f"{text!r} has {len(words)} words; the model reads at most 8")
            ids = [TOKEN_IDS[w] for w in words]
        out.append(ids + [PAD_ID] * (MAX_TOKENS - len(ids)))
    return out


def skill_prompts(skill: str) -> list[str]:
    """Every caption of one skill (both splits), in a fixed order."""
    if skill == "single_object":
        return [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    if skill == "counting":
        return [
            f"{NUMBER_WORDS[n]} {c} {PLURALS[s]}"
            for n in (2, 3, 4)
            for c in COLOURS
            for s in SHAPES
        ]
    two = [
        (c1, s1, c2, s2)
        for c1 in COLOURS
        for s1 in SHAPES
        for c2 in COLOURS
        for s2 in SHAPES
        if s1 != s2
    ]
    if skill == "two_object":
        return [f"a {c1} {s1} and a {c2} {s2}" for c1, s1, c2, s2 in two if c1 == c2]
    if skill == "colour_attr":
        return [f"a {c1} {s1} and a {c2} {s2}" for c1, s1, c2, s2 in two if c1 != c2]
    if skill == "position":
        return [
            f"a {c1} {s1} {rel} a {c2} {s2}"
            for rel in RELATIONS
            for c1, s1, c2, s2 in two
            if c1 != c2
        ]
    raise ValueError(f"unknown skill {skill!r}; skills: {', '.join(SKILLS)}")


def is_heldout(prompt: str) -> bool:
    """Whether a caption mentions a held-out colour-shape pair."""
    return bool(parse_prompt(prompt).pairs() & set(HELDOUT_PAIRS))


def split_prompts(skill: str, split: str, cap: int | None = None) -> list[str]:
    """The ``train`` or ``heldout`` captions of a skill; ``cap``: a fixed random subset.

    The subset is drawn with a fixed seed, so the lists are the same on every machine.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    prompts = [p for p in skill_prompts(skill) if is_heldout(p) == (split == "heldout")]
    if cap is not None and len(prompts) > cap:
        keep = set(random.Random(SKILLS.index(skill)).sample(range(len(prompts)), cap))
        prompts = [p for i, p in enumerate(prompts) if i in keep]
    return prompts


#: RL training prompts: up to 24 per skill, grouped by skill.
TRAIN_PROMPTS: list[str] = [p for s in SKILLS for p in split_prompts(s, "train", TRAIN_PER_SKILL)]
#: Held-out prompts (each mentions a held-out colour-shape pair): up to 12 per skill.
HELDOUT_PROMPTS: list[str] = [
    p for s in SKILLS for p in split_prompts(s, "heldout", HELDOUT_PER_SKILL)
]
