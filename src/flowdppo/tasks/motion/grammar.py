"""Prompt grammar of the motion task: captions of moving shapes, their parser, tokens, split.

A caption names one or two objects, each with its motion::

    a red square moving left
    a small yellow circle moving down fast
    a blue circle moving up and a large green triangle moving right slowly

Per object: an optional size (``small``, ``large``), a colour, a shape, ``moving`` and a
direction (``left``, ``right``, ``up``, ``down``), then an optional speed (``slowly``,
``fast``). A size or speed the caption leaves out may be either. The two objects of a
caption differ in colour or shape (that is what tells them apart frame to frame).

The split holds out three shape-direction pairs (:data:`HELDOUT_PAIRS`): every caption with
an object of such a pair is held out, every other one is a training caption.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from flowdppo.tasks.shapes.grammar import COLOURS, NULL, PAD, SHAPES

SIZES: tuple[str, ...] = ("small", "large")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
SPEEDS: tuple[str, ...] = ("slowly", "fast")
#: The evaluation groups (a task's ``eval_group``): captions with one or two objects.
GROUPS: tuple[str, ...] = ("one", "two")

#: Shape-direction pairs no training caption has: one per shape, three of the four
#: directions, so every shape and direction is still trained on (only the pair is new).
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "up"),
    ("square", "left"),
    ("triangle", "right"),
)
#: Captions per group in the training and held-out lists.
TRAIN_PER_GROUP, HELDOUT_PER_GROUP = 24, 12

#: Word ids: 0 pads, 1 is the null caption of classifier-free guidance, then the grammar's.
VOCAB = (PAD, NULL, "a", "and", "moving", *SIZES, *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS)
TOKEN_IDS: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, NULL_ID = TOKEN_IDS[PAD], TOKEN_IDS[NULL]
#: The longest caption: two objects of 7 words and "and".
MAX_TOKENS = 15

EXAMPLE = "a small red square moving left fast"


class PromptError(ValueError):
    """A caption outside the motion grammar; ``word`` is the first word not understood."""

    def __init__(self, prompt: str, word: str, expected: str):
        self.prompt, self.word = prompt, word
        where = f"{word!r} is not understood" if word else "the caption ends early"
        super().__init__(
            f"{prompt!r}: {where}: expected {expected} (captions look like {EXAMPLE!r}, "
            "optionally '... and <a second object>')"
        )


@dataclass(frozen=True)
class MovingObject:
    """One object and its motion; ``size`` and ``speed`` are ``None`` when not asked for."""

    shape: str
    colour: str
    direction: str
    size: str | None = None
    speed: str | None = None

    def phrase(self) -> str:
        words = ["a", self.size, self.colour, self.shape, "moving", self.direction, self.speed]
        return " ".join(w for w in words if w)

    @property
    def pair(self) -> tuple[str, str]:
        return self.shape, self.direction


@dataclass(frozen=True)
class MotionSpec:
    """A parsed caption: one or two moving objects."""

    objects: tuple[MovingObject, ...]

    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects)

    @property
    def group(self) -> str:
        return GROUPS[len(self.objects) - 1]


def _expect(words: list[str], i: int, choices: tuple[str, ...], what: str, text: str) -> str:
    word = words[i] if i < len(words) else ""
    if word not in choices:
        raise PromptError(
            text, word, what if len(choices) == 1 else f"{what} ({', '.join(choices)})"
        )
    return word


def _parse_object(words: list[str], i: int, text: str) -> tuple[MovingObject, int]:
    _expect(words, i, ("a",), "'a'", text)
    i += 1
    size = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    colour = _expect(words, i, COLOURS, "a size or colour" if size is None else "a colour", text)
    shape = _expect(words, i + 1, SHAPES, "a shape", text)
    _expect(words, i + 2, ("moving",), "'moving'", text)
    direction = _expect(words, i + 3, DIRECTIONS, "a direction", text)
    i += 4
    speed = None
    if i < len(words) and words[i] in SPEEDS:
        speed, i = words[i], i + 1
    return MovingObject(shape, colour, direction, size, speed), i


def parse_prompt(text: str) -> MotionSpec:
    """Parse a caption of the grammar (raises :class:`PromptError` naming the first word it
    does not understand)."""
    words = text.lower().split()
    first, i = _parse_object(words, 0, text)
    objects = [first]
    if i < len(words):
        if words[i] != "and":
            what = "'and'" if first.speed else f"a speed ({', '.join(SPEEDS)}) or 'and'"
            raise PromptError(text, words[i], what)
        second, i = _parse_object(words, i + 1, text)
        if (second.colour, second.shape) == (first.colour, first.shape):
            raise PromptError(
                text,
                second.shape,
                f"a second object of another colour or shape than the first "
                f"({first.colour} {first.shape})",
            )
        objects.append(second)
        if i < len(words):
            raise PromptError(text, words[i], "the end of the caption (two objects at most)")
    return MotionSpec(tuple(objects))


def tokenize(prompts: list[str], null: list[bool] | None = None) -> list[list[int]]:
    """Word ids of each caption, right-padded to :data:`MAX_TOKENS`.

    An empty caption (or ``null[i]``) is the null caption of classifier-free guidance; any
    other caption must parse (:class:`PromptError` otherwise).
    """
    rows = []
    for i, text in enumerate(prompts):
        dropped = (null is not None and null[i]) or not text.split()
        ids = [NULL_ID] if dropped else [TOKEN_IDS[w] for w in _words(text)]
        rows.append(ids + [PAD_ID] * (MAX_TOKENS - len(ids)))
    return rows


@functools.lru_cache(maxsize=8192)
def _words(text: str) -> tuple[str, ...]:
    return tuple(parse_prompt(text).caption().split())


def _objects(shape_dirs: list[tuple[str, str]]) -> list[MovingObject]:
    return [
        MovingObject(s, c, d, size, speed)
        for s, d in shape_dirs
        for c in COLOURS
        for size in (None, *SIZES)
        for speed in (None, *SPEEDS)
    ]


def is_heldout(prompt: str | MotionSpec) -> bool:
    """Whether a caption has an object of a held-out shape-direction pair."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return any(o.pair in HELDOUT_PAIRS for o in spec.objects)


def split_prompts(group: str, split: str, n: int) -> list[str]:
    """``n`` captions of one group (``one`` or ``two`` objects) and split (``train`` or
    ``heldout``), drawn with a fixed seed, so the lists are the same on every machine.

    A held-out two-object caption pairs a held-out object with a trained one.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    pairs = [(s, d) for s in SHAPES for d in DIRECTIONS]
    trained = _objects([p for p in pairs if p not in HELDOUT_PAIRS])
    held = _objects(list(HELDOUT_PAIRS))
    rng = random.Random(f"{group}-{split}")
    out: list[str] = []
    while len(out) < n:
        first = rng.choice(held if split == "heldout" else trained)
        if group == "one":
            objects = (first,)
        elif group == "two":
            second = rng.choice(trained)
            if (second.colour, second.shape) == (first.colour, first.shape):
                continue
            objects = (first, second) if rng.random() < 0.5 else (second, first)
        else:
            raise ValueError(f"unknown group {group!r}; groups: {', '.join(GROUPS)}")
        caption = MotionSpec(objects).caption()
        if caption not in out:
            out.append(caption)
    return out


def _interleaved(split: str, n: int) -> list[str]:
    # one, two, one, two, ...: the first N prompts (log.eval_prompts) hold both groups.
    lists = [split_prompts(g, split, n) for g in GROUPS]
    return [p for row in zip(*lists) for p in row]


#: RL training captions: 24 with one object and 24 with two, interleaved.
TRAIN_PROMPTS: list[str] = _interleaved("train", TRAIN_PER_GROUP)
#: Held-out captions (each has an object of a held-out shape-direction pair): 12 + 12.
HELDOUT_PROMPTS: list[str] = _interleaved("heldout", HELDOUT_PER_GROUP)


def group_of(prompt: str) -> str:
    """The evaluation group of a caption: ``one`` or ``two`` objects."""
    return parse_prompt(prompt).group
