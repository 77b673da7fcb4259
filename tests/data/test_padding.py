"""pad_inputs gives what tokenizer.pad gives, on either side, to a multiple of 8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmtune.data import pad_inputs


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pair", [False, True])
def test_pad_inputs_equals_tokenizer_pad(tiny_model_dir: Path, side: str, pair: bool) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = side
    texts = ["good movie", "a really bad and boring movie that i did not like", "ok"]
    rows = [dict(tokenizer(t, "second part" if pair else None)) for t in texts]
    for row in rows:
        row["labels"], row["length"] = 1, len(row["input_ids"])  # other fields are ignored
    ours = pad_inputs(rows, tokenizer, 8)
    theirs = tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask", "token_type_ids")} for r in rows],
                           padding=True, pad_to_multiple_of=8, return_tensors="pt")
    assert set(ours) == set(theirs)
    assert ours["input_ids"].shape[1] % 8 == 0
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_rows_without_attention_mask_get_one(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_inputs([{"input_ids": [2, 5, 3]}, {"input_ids": [2, 3]}], tokenizer)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["input_ids"][1, 2].item() == tokenizer.pad_token_id
