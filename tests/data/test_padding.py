"""pad_inputs gives what tokenizer.pad gives, on either side, to a multiple of 8; batch widths and their cap."""

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


def test_widths_are_multiples_capped_at_the_max_width(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from lmtune.data.padding import batch_width

    assert [batch_width(n, 48, 384) for n in (1, 48, 49, 337, 384)] == [48, 48, 96, 384, 384]
    assert [batch_width(n, 64, 104) for n in (10, 65, 100)] == [64, 104, 104]  # the cap, not 128
    assert batch_width(130, 64, 104) == 130  # never narrower than the longest row
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"input_ids": list(range(2, 2 + n))} for n in (70, 5)]
    assert pad_inputs(rows, tokenizer, 64, max_width=104)["input_ids"].shape == (2, 104)


def test_default_multiple_gives_few_widths_on_a_gpu_only() -> None:
    from lmtune.session import pad_multiple

    assert pad_multiple(None, 384, "cpu") == 8
    assert [pad_multiple(None, n, "cuda") for n in (128, 384, 512, 100)] == [16, 48, 64, 16]
    assert pad_multiple(32, 384, "cuda") == 32  # a configured multiple wins
    for length in (100, 128, 300, 384, 512, 1024):
        multiple = pad_multiple(None, length, "cuda")
        assert multiple % 8 == 0 and -(-length // multiple) <= 8
