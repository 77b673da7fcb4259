"""Padding token rows into batch tensors: what `tokenizer.pad` does, without its per-row Python overhead."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def pad_inputs(rows: Sequence[dict[str, Any]], tokenizer: Any, pad_to_multiple_of: int = 1,
               side: str | None = None, max_width: int | None = None) -> dict[str, Any]:
    """Pad the model inputs of `rows` (lists of ints) to one width, a multiple of `pad_to_multiple_of`
    (but no wider than `max_width` or the longest row, whichever is more).

    Same result as `tokenizer.pad(..., padding=True, return_tensors="pt")` (tested), several times faster:
    the collate runs once per training step, and for small models it is a large share of the step.
    `side` defaults to the tokenizer's padding side; rows without `attention_mask` get one.
    """
    import torch  # here, not at import: reading data needs no torch

    side = side or tokenizer.padding_side
    lengths = np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))
    width = batch_width(int(lengths.max()), pad_to_multiple_of, max_width)
    pads = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0,
            "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    keys = [k for k in INPUT_KEYS if k in rows[0]]
    if "attention_mask" not in keys:
        keys.append("attention_mask")
    # Where each row's tokens go, in row-major order: one scatter per key instead of a copy per row.
    columns = np.arange(width)
    real = columns >= (width - lengths)[:, None] if side == "left" else columns < lengths[:, None]
    total = int(lengths.sum())
    batch = {}
    for key in keys:
        out = np.full((len(rows), width), pads[key], dtype=np.int64)
        if key in rows[0]:
            out[real] = np.fromiter(itertools.chain.from_iterable(r[key] for r in rows), dtype=np.int64,
                                    count=total)
        else:
            out[real] = 1
        batch[key] = torch.from_numpy(out)
    return batch


def batch_width(longest: int, multiple: int, max_width: int | None = None) -> int:
    """`longest` rounded up to a multiple of `multiple`, capped at `max_width` (never below `longest`)."""
    width = -(-longest // multiple) * multiple
    return width if max_width is None else max(longest, min(width, max_width))
