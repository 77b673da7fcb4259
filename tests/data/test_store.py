"""The on-disk token store: tokenized once and reused, packed rows equal to packing in memory, resume in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmtune
from lmtune.data import store
from lmtune.data.text import pack, read_documents
from lmtune.tasks import lm_common

WORDS = "the film was good and i loved it bad drug awful night one two three people love this story".split()


def corpus(path: Path, n: int = 60) -> Path:
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 11)) for i in range(n)]
    lines[5] = ""  # blank lines make no document
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "store"


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("processes", [1, 2])
def test_packing_from_the_store_equals_packing_in_memory(processes: int, tiny_decoder_dir: Path, tmp_path: Path,
                                                         cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "DOCS_PER_PROCESS", 20 if processes == 2 else 10**9)
    monkeypatch.setattr(store, "BATCH", 7)  # several written batches, rows crossing their edges
    monkeypatch.setattr(store, "cpus", lambda: processes)
    tok = tokenizer_of(tiny_decoder_dir)
    docs = read_documents(str(corpus(tmp_path / "c.txt")))
    assert docs.cache_files and len(docs) == 59  # memory-mapped from the store, the blank line dropped
    texts = docs["text"][:]
    tokens = store.tokenize(docs, tok)
    in_memory = lm_common.tokenize_documents(texts, tok)
    assert [list(t) for t in tokens["input_ids"]] == in_memory
    assert store.lengths(tokens).tolist() == [len(t) for t in in_memory]
    rows = store.packed(tokens, 16)
    expected = pack(in_memory, 16)
    assert rows["input_ids"][:] == [r["input_ids"] for r in expected]
    assert rows["position_ids"][:] == [r["position_ids"] for r in expected]
    assert rows["length"][:] == [len(r["input_ids"]) for r in expected]
    order = [5, 0, 58, 3, 3, 17, 40]  # a document may come twice (replay reused)
    shuffled = store.packed(tokens, 16, order)
    assert shuffled["input_ids"][:] == [r["input_ids"] for r in pack([in_memory[i] for i in order], 16)]
    assert len(list(cache.glob("tokens-*"))) == processes and len(list(cache.glob("packed-*"))) == 2


def test_the_store_is_reused_on_a_second_read_not_rebuilt(tiny_decoder_dir: Path, tmp_path: Path, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tokenizer_of(tiny_decoder_dir)
    path = str(corpus(tmp_path / "c.txt"))
    first = store.packed(store.tokenize(read_documents(path), tok), 16)
    files = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    assert any(n.startswith("text-") for n in files) and any(n.startswith("tokens-") for n in files)

    calls = []
    original = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    second = store.packed(store.tokenize(read_documents(path), tok), 16)
    assert not calls  # nothing tokenized again
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == files  # nothing written again
    assert second["input_ids"][:] == first["input_ids"][:]
    (tmp_path / "c.txt").write_text("a changed corpus\n", encoding="utf-8")  # a changed file is read afresh
    assert read_documents(path)["text"][:] == ["a changed corpus"]


def test_a_rewrite_of_the_same_size_and_time_is_read_afresh_and_a_damaged_file_rebuilt(tmp_path: Path,
                                                                                     cache: Path) -> None:
    import os

    path = tmp_path / "c.txt"
    path.write_text("alpha beta\ngamma\n", encoding="utf-8")
    assert read_documents(str(path))["text"][:] == ["alpha beta", "gamma"]
    stat = path.stat()
    path.write_text("ALPHA BETA\nGAMMA\n", encoding="utf-8")  # same size; the time set back as cp -p would
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read_documents(str(path))["text"][:] == ["ALPHA BETA", "GAMMA"]
    for stored in cache.glob("text-*.arrow"):
        stored.write_bytes(b"")  # cut short, as a crash before the disk had it would leave it
    assert read_documents(str(path))["text"][:] == ["ALPHA BETA", "GAMMA"]


def test_a_causal_lm_run_resumed_mid_epoch_continues_at_the_same_rows(tiny_decoder_dir: Path, tmp_path: Path,
                                                                       cache: Path) -> None:
    general = corpus(tmp_path / "general.txt", 20)
    cfg = {"model": {"name": str(tiny_decoder_dir), "max_length": 16},
           "data": {"train": str(corpus(tmp_path / "train.txt")), "validation_size": 4, "test_size": 0,
                    "replay": {"path": str(general), "ratio": 0.2}},
           "task": {"name": "causal_lm"}, "method": {"name": "full"},
           "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0, "eval_every": 3,
                     "load_best": False},
           "output": {"dir": str(tmp_path / "runs"), "name": "straight"}}
    straight = lmtune.train(cfg)
    cfg["output"]["name"] = "resumed"

    class Interrupt(Exception):
        pass

    def crash(state) -> None:
        if state.step == 5:  # after the step-3 checkpoint, mid-epoch
            raise Interrupt

    with pytest.raises(Interrupt):
        lmtune.train(cfg, callbacks=[crash])
    resumed = lmtune.train(cfg, resume=True)
    assert resumed.metrics["steps"] == straight.metrics["steps"] > 5
    a = load_file(str(straight.run_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert straight.metrics["data"]["replay"]["documents"] > 0


def test_parsed_files_are_kept_on_disk_so_their_tokenization_is_reused(tmp_path: Path, cache: Path) -> None:
    """CoNLL and SQuAD files are parsed in Python: written to the store, their maps (the task's tokenization, named
    by data + tokenizer + settings) are kept on disk by datasets and read back by the next run."""
    import json

    from lmtune.data.conll import NerReadOptions, read_ner
    from lmtune.data.squad import read_squad

    path = tmp_path / "a.conll"
    path.write_text("EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn I-PER\n", encoding="utf-8")
    calls: list[int] = []

    def encode(batch: dict) -> dict:
        calls.append(1)
        return {"n": [len(t) for t in batch["tokens"]]}

    first = read_ner(path, NerReadOptions())[0]
    assert first.cache_files and first["tokens"][:] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    a = first.map(encode, batched=True, new_fingerprint="tokenized-1")
    second = read_ner(path, NerReadOptions())[0]
    b = second.map(encode, batched=True, new_fingerprint="tokenized-1")
    assert len(calls) == 1 and a["n"][:] == b["n"][:] == [2, 2]
    squad = tmp_path / "q.jsonl"
    squad.write_text(json.dumps({"id": "1", "question": "who?", "context": "Ann ran.",
                                 "answers": {"text": ["Ann"], "answer_start": [0]}}) + "\n", encoding="utf-8")
    assert read_squad(squad)[0].cache_files


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(cache: Path) -> None:
    """kill -9 mid-write leaves `.<file>.<pid>.<id>.tmp` (as large as what was written): the next write of that file
    removes it once its process is gone and it has been idle; a live writer's file is left alone."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(dead.stdout)  # a process that has exited (its pid not reused within this test)
    cache.mkdir(parents=True, exist_ok=True)
    orphan = cache / f".rows-{'k' * 24}.arrow.{gone}.0a1b2c3d.tmp"
    live = cache / f".rows-{'k' * 24}.arrow.{os.getpid()}.0a1b2c3e.tmp"
    fresh = cache / f".rows-{'k' * 24}.arrow.{gone}.0a1b2c3f.tmp"
    for f in (orphan, live, fresh):
        f.write_bytes(b"x" * 100)
    for f in (orphan, live):
        os.utime(f, (1_000_000_000, 1_000_000_000))  # idle for years
    ds = store.stored("rows", "k" * 24, store.TOKENS, lambda: [{"input_ids": [[1, 2, 3]]}])
    assert ds["input_ids"][:] == [[1, 2, 3]]
    assert not orphan.exists()
    assert live.exists() and fresh.exists()  # a running writer's, and one written to a moment ago
