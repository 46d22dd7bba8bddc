"""The text task's words, prompts and character tokens.

72 common English words, 24 each of 3, 5 and 8 letters: 16 of each length are trained on,
8 of each are held out (never trained on by RL; the forgetting metrics read them). Every
prompt asks for one word in double quotes, ``a sign that says "river"``; the model reads
only the quoted word, letter by letter (the rest of the prompt does not change the image),
and the ``ocr`` reward compares what it recognises with the same quoted word.
"""

from __future__ import annotations

import re

#: Trained words, by length.
TRAIN_WORDS: dict[int, list[str]] = {
    3: "cat sun map red box hat cup pen dog car bed key owl fox ice jam".split(),
    5: "river apple house light stone plant water bread chair cloud green music "
    "train heart smile night".split(),
    8: "mountain elephant computer sunshine treasure calendar shoulder painting "
    "building question dinosaur hospital kangaroo football triangle umbrella".split(),
}
#: Held-out words, by length (disjoint from the trained ones).
HELDOUT_WORDS: dict[int, list[str]] = {
    3: "bus egg leg arm web oak pig zoo".split(),
    5: "table grape horse beach money sheep tiger paper".split(),
    8: "keyboard airplane festival mushroom necklace scissors vacation magazine".split(),
}

#: Longest word the character encoder reads.
MAX_CHARS = 12
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
PAD_ID, NULL_ID = 0, 1
#: Token ids: padding, the null word (unconditional, for guidance), then the letters.
VOCAB_SIZE = 2 + len(ALPHABET)
TEMPLATE = 'a sign that says "{}"'
_QUOTED = re.compile(r'"([^"]*)"')


class WordError(ValueError):
    """A prompt the text task's model cannot read."""


def prompt_for(word: str) -> str:
    return TEMPLATE.format(word)


def word_of(prompt: str) -> str:
    """The quoted word of a prompt (a bare word is its own word), checked against what the
    character encoder reads: 1 to MAX_CHARS letters a-z, any case."""
    found = _QUOTED.findall(prompt)
    word = found[0] if len(found) == 1 else (prompt if not found else None)
    if word is None:
        raise WordError(f"text task prompt {prompt!r} quotes {len(found)} parts; quote one word")
    word = word.strip().lower()
    if not 1 <= len(word) <= MAX_CHARS or any(c not in ALPHABET for c in word):
        raise WordError(
            f"text task prompt {prompt!r}: the quoted word must be 1-{MAX_CHARS} letters a-z "
            f"(as in {prompt_for('river')!r})"
        )
    return word


def tokenize(prompts: list[str], null: list[bool] | None = None) -> list[list[int]]:
    """Letter ids of every prompt's word, padded to MAX_CHARS; ``null[i]`` gives row i the
    null word instead (caption dropout in pretraining, the unconditional branch of guidance)."""
    rows = []
    for i, prompt in enumerate(prompts):
        if null is not None and null[i]:
            ids = [NULL_ID]
        else:
            ids = [2 + ALPHABET.index(c) for c in word_of(prompt)]
        rows.append(ids + [PAD_ID] * (MAX_CHARS - len(ids)))
    return rows


def _interleaved(words: dict[int, list[str]]) -> list[str]:
    # 3, 5, 8, 3, 5, 8, ...: the first N prompts (log.eval_prompts) span every length.
    return [prompt_for(w) for row in zip(*(words[n] for n in sorted(words))) for w in row]


TRAIN_PROMPTS = _interleaved(TRAIN_WORDS)
HELDOUT_PROMPTS = _interleaved(HELDOUT_WORDS)
ALL_WORDS = [w for d in (TRAIN_WORDS, HELDOUT_WORDS) for n in sorted(d) for w in d[n]]
