"""Names for tokenized datasets (datasets' `map(new_fingerprint=...)`): by default datasets names a map's result by
pickling the function into a hash, tokenizer and all, on every call (~150 ms for a 30k-word vocabulary: most of a
one-sentence prediction). Here the tokenizer's content is hashed once and reused."""

from __future__ import annotations

import hashlib
from typing import Any

ENCODING = "2026-12-07"  # change whenever a task's encode changes what it writes: cached maps of the old one then go


def tokenizer_key(tokenizer: Any) -> str:
    """A hash of what the (fast) tokenizer does: its vocabulary, rules, added tokens and settings."""
    key = getattr(tokenizer, "_lmtune_key", None)
    if key is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
        extra = repr((type(tokenizer).__name__, tokenizer.padding_side, tokenizer.truncation_side,
                      tokenizer.model_max_length, sorted(map(str, tokenizer.all_special_tokens))))
        key = hashlib.sha256((text + extra).encode("utf-8")).hexdigest()[:20]
        tokenizer._lmtune_key = key
    return key


def tokenized(ds: Any, tokenizer: Any, *settings: Any) -> str:
    """The fingerprint of `ds` tokenized by `tokenizer` under `settings` (max length, task options ...)."""
    parts = [ds._fingerprint, tokenizer_key(tokenizer), ENCODING, *map(repr, settings)]
    return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()[:20]
