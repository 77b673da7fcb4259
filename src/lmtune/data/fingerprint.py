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


def in_memory(columns: dict[str, list], features: Any = None) -> Any:
    """A dataset of prediction inputs, held in memory and named at random: `Dataset.from_dict` names a table by
    hashing every value in it (about 5 ms for a few sentences, a third of a served request's pass), and nothing made
    from these inputs is ever looked up again by name."""
    import uuid

    import datasets
    from datasets.table import InMemoryTable

    if features is not None:
        table = InMemoryTable.from_pydict(features.encode_batch(columns), schema=features.arrow_schema)
    else:
        table = InMemoryTable.from_pydict(columns)
    return datasets.Dataset(table, fingerprint=uuid.uuid4().hex[:16])


def mapped(ds: Any, function: Any, fingerprint: str, *, with_indices: bool = False) -> Any:
    """`ds.map(function, batched=True)` keeping only what `function` returns, named `fingerprint`. Prediction inputs
    (a small dataset held in memory) skip datasets' map machinery, several ms even for one row: `function` gets
    them as one batch, as the map would give them."""
    if not ds.cache_files and len(ds) <= 1000:  # map's batch size: one batch either way
        batch = ds[:]
        return in_memory(dict(function(batch, list(range(len(ds)))) if with_indices else function(batch)))
    return ds.map(function, batched=True, with_indices=with_indices, remove_columns=ds.column_names,
                  new_fingerprint=fingerprint)
