"""NER's words and windows: raw text cut into words, long sentences cut into overlapping windows of sub-tokens,
word tags aligned to sub-tokens."""

from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np
import regex

# Raw text -> words, cut the way CoNLL-style corpora are: abbreviations (U.S.) and inner - . / & @ (1996-08-22,
# 3.5) stay in the word, clitics ('s, 're) split off, any other punctuation mark is a word of its own. Combining
# marks stay in their word (Devanagari, Arabic vowel signs, a decomposed é); Chinese and Japanese characters, which
# no space separates, are a word each, as character-tagged corpora have them.
_CJK = r"[\p{Han}\p{Hiragana}\p{Katakana}]"
_LETTERS = rf"(?:(?!{_CJK})[\w\p{{M}}\p{{No}}])+"  # \p{{No}}: H₂O, m² (the regex module's \w leaves them out)
WORD = regex.compile(rf"(?:[^\W\d_]\.){{2,}}|['’](?:s|re|ve|ll|d|m|t)\b|{_CJK}\p{{M}}*|{_LETTERS}(?:[-.&/@]{_LETTERS})*"
                     r"|[^\w\s]", regex.IGNORECASE)
_TAG_NAME = re.compile(r"^(?:O|[BI]-.+)$")


def tag_names(types: Iterable[str]) -> list[str]:
    """The model's labels: O, then B- and I- of every entity type."""
    return ["O"] + [f"{prefix}-{kind}" for kind in types for prefix in "BI"]


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Words of raw text and their character spans (start, end) in it."""
    matches = list(WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def plan_windows(sizes: list[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Word ranges [start, end) covering every word, each within `budget` sub-tokens (a lone longer word is
    cut by the tokenizer), consecutive ranges sharing whole words worth at most `stride` sub-tokens."""
    windows, start = [], 0
    while True:
        end, used = start, 0
        while end < len(sizes) and (end == start or used + sizes[end] <= budget):
            used += sizes[end]
            end += 1
        windows.append((start, end))
        if end >= len(sizes):
            return windows
        # Step back over whole words for shared context, leaving room for the next new word.
        nxt, shared, room = end, 0, min(stride, budget - sizes[end])
        while nxt - 1 > start and shared + sizes[nxt - 1] <= room:
            nxt -= 1
            shared += sizes[nxt]
        start = nxt


def owned_ranges(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Which words each window answers for: a word in an overlap goes to the window where it is further from
    the edge (more context), so every word is predicted exactly once."""
    cuts = [(b[0] + a[1] + 1) // 2 for a, b in zip(windows, windows[1:])]
    bounds = [windows[0][0]] + cuts + [windows[-1][1]]
    return list(zip(bounds, bounds[1:]))


def spells_leading_spaces(tokenizer: Any) -> bool:
    """Byte-level BPE (GPT-2, RoBERTa, SmolLM2, Llama 3) spells a word's leading space into its first token. Given
    words one by one it sees no space, so every word would be tokenized as if it began a text ("lives" as l + ives
    where running text has " lives"): such tokenizers get a space before each word, as run_ner's
    add_prefix_space=True gives them."""
    from lmtune.models import byte_level_steps

    return any(not step.get("add_prefix_space") for step in byte_level_steps(tokenizer))


def split_long(words: list[str], word_ids: list[int | None], tokenizer: Any, max_length: int, budget: int,
               stride: int) -> list[tuple[tuple[int, int], dict, list[int | None]]]:
    """Windows of whole words for a sentence longer than max_length, each tokenized on its own."""
    sizes = np.bincount([w for w in word_ids if w is not None], minlength=len(words)).tolist()
    ranges = plan_windows(sizes, budget, stride)
    enc = tokenizer([words[a:b] for a, b in ranges], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    return [((a, b), {k: enc[k][i] for k in enc.keys()},
             [None if w is None else w + a for w in enc.word_ids(i)]) for i, (a, b) in enumerate(ranges)]


def align_labels(word_ids: list[int | None], tag_ids: list[int], inside: list[int], all_subtokens: bool) -> list[int]:
    """Token labels: the word's tag on its first sub-token, -100 (ignored by the loss) on the others, or the
    inside tag there with all_subtokens."""
    labels, previous = [], None
    for w in word_ids:
        if w is None:
            labels.append(-100)
        elif w != previous:
            labels.append(tag_ids[w])
        else:
            labels.append(inside[tag_ids[w]] if all_subtokens else -100)
        previous = w
    return labels
