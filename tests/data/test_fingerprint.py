"""Prediction inputs held in memory: named at random, and mapped without datasets' map machinery, to the same rows."""

from __future__ import annotations

from pathlib import Path

from lmtune.data.fingerprint import in_memory, mapped


def test_small_in_memory_inputs_skip_the_map_and_give_the_same_rows(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = in_memory({"text": ["a good film", "bad", "the story of one people in the year"]})
    assert not ds.cache_files and ds._fingerprint != in_memory({"text": ["bad"]})._fingerprint

    def encode(batch: dict, indices: list[int] | None = None) -> dict:
        enc = tok(batch["text"], truncation=True, max_length=6)
        return {**enc, "length": [len(ids) for ids in enc["input_ids"]], **({"row": indices} if indices else {})}

    fast = mapped(ds, encode, "k1")
    slow = ds.map(encode, batched=True, remove_columns=ds.column_names)
    assert fast.column_names == slow.column_names and fast[:] == slow[:]
    indexed = mapped(ds, encode, "k2", with_indices=True)
    assert indexed["row"][:] == [0, 1, 2] and indexed["input_ids"][:] == slow["input_ids"][:]
