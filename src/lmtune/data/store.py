"""The on-disk token store: documents tokenized once into Arrow files in lmtune's cache (memory-mapped, named by what
made them, so a second run on the same data and tokenizer reuses them) and packed into rows from there a batch of
documents at a time, so a corpus larger than memory trains in memory that does not grow with it."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import datasets
import numpy as np
import pyarrow as pa

from lmtune.data.fingerprint import tokenized

VERSION = "1"  # change when a file's layout changes: files of the old layout are then never read
BATCH = 1000  # documents tokenized, or rows written, at a time
DOCS_PER_PROCESS = 20_000  # below this many documents a tokenizing process costs more to start than it saves
TOKENS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
ROWS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                          "position_ids": datasets.Sequence(datasets.Value("int32")),
                          "length": datasets.Value("int32")})


def store_dir() -> Path:
    from lmtune.data.builtin import cache_dir

    return cache_dir() / "store"


def key_of(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, (VERSION, *parts))).encode("utf-8")).hexdigest()[:24]


def stored(name: str, key: str, features: datasets.Features, batches: Callable[[], Iterable[dict]]) -> datasets.Dataset:
    """The Arrow file `<name>-<key>.arrow` of the store, memory-mapped; written from `batches()` first when missing
    (to a temporary file renamed into place: a run stopped half-way leaves no half file, and of two processes
    writing the same file the later rename wins with the same content)."""
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import MemoryMappedTable

    target = store_dir() / f"{name}-{key}.arrow"
    if target.is_file():
        try:
            return datasets.Dataset(MemoryMappedTable.from_file(str(target)), fingerprint=key)
        except (OSError, pa.ArrowException) as err:  # cut short (a crash before the disk had it): made again
            logging.getLogger("lmtune").warning("%s is damaged (%s): writing it again", target, err)
            target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        writer = ArrowWriter(features=features, path=str(tmp))
        for batch in batches():
            writer.write_table(batch) if isinstance(batch, pa.Table) else writer.write_batch(batch)
        writer.finalize()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before it takes the name a later run trusts
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return datasets.Dataset(MemoryMappedTable.from_file(str(target)), fingerprint=key)


def _remove_orphans(target: Path, idle: float = 3600.0) -> None:
    """Delete the temporary files of `target` left by writers killed before they could (kill -9, a machine that went
    down): each as large as what its writer had written. Only files named by a process no longer running here and
    untouched for `idle` seconds (a live writer on another machine sharing the cache keeps its file's time fresh)."""
    import time

    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        pid = tmp.name[len(target.name) + 2:].split(".", 1)[0]
        try:
            stale = time.time() - tmp.stat().st_mtime > idle
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        if pid.isdigit() and stale and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def on_disk(ds: datasets.Dataset) -> datasets.Dataset:
    """A dataset parsed into memory (CoNLL, SQuAD JSON) written to the store under its fingerprint (datasets' hash of
    its content) and memory-mapped back: datasets then keeps its maps (tokenization) on disk beside it, and the next
    run on the same data reuses them instead of tokenizing again."""
    if ds.cache_files:
        return ds
    if ds._indices is not None:
        ds = ds.flatten_indices()
    return stored("data", key_of("data", ds._fingerprint), ds.features, lambda: [ds.data.table])


def eos_id(tokenizer: Any) -> int:
    """The token that ends each document, so the model learns where documents end (and packing separates them)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; documents cannot be separated when packed")
    return tokenizer.eos_token_id


def tokenize_documents(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document followed by EOS."""
    eos = eos_id(tokenizer)
    return [[*t, eos] for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tokenize(ds: datasets.Dataset, tokenizer: Any, keep: tuple[str, ...] = ()) -> datasets.Dataset:
    """`ds`'s `text` column as token ids, each document followed by EOS (so the model learns where documents end),
    plus the columns in `keep`. Data read from files (on disk, named by content) is tokenized once into the store,
    by several processes when it is large; data held in memory only is tokenized in memory."""
    eos_id(tokenizer)  # refused before any work, also for no documents
    features = datasets.Features({**TOKENS, **{name: ds.features[name] for name in keep}})

    def encode(batch: dict) -> dict:
        return {"input_ids": tokenize_documents(batch["text"], tokenizer), **{name: batch[name] for name in keep}}

    drop = [c for c in ds.column_names if c not in keep]
    if not ds.cache_files:
        where: dict[str, Any] = {"keep_in_memory": True}
    else:
        key = tokenized(ds, tokenizer, "documents", keep, VERSION)
        processes = max(1, min(cpus(), len(ds) // DOCS_PER_PROCESS))
        store_dir().mkdir(parents=True, exist_ok=True)
        where = {"num_proc": processes if processes > 1 else None, "new_fingerprint": key,
                 "cache_file_name": str(store_dir() / f"tokens-{key}.arrow"), "load_from_cache_file": True,
                 "desc": "tokenizing"}
    return ds.map(encode, batched=True, batch_size=BATCH, remove_columns=drop, features=features, **where)


def cpus() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def lengths(tokens: datasets.Dataset) -> np.ndarray:
    """Each document's token count, read from the Arrow offsets (no token is loaded)."""
    column = _column(tokens)
    return np.concatenate([np.diff(chunk.offsets.to_numpy()) for chunk in column.chunks] or [np.zeros(0, np.int64)])


def packed(tokens: datasets.Dataset, max_length: int, order: np.ndarray | None = None) -> datasets.Dataset:
    """Rows of `max_length` tokens (columns input_ids, position_ids, length): the documents of `tokens`, in `order`
    (indices; default: as stored), concatenated and cut, with position ids restarting where each document starts,
    as `lmtune.data.text.pack` does in memory. Stored in the store under the tokens' name, the length and the order."""
    where = hashlib.sha256(np.asarray(order, np.int64).tobytes()).hexdigest()[:16] if order is not None else "stored"
    key = key_of(tokens._fingerprint, max_length, where)
    return stored("packed", key, ROWS, lambda: _pack(_documents(tokens, order), max_length))


def _column(tokens: datasets.Dataset) -> Any:
    if tokens._indices is not None:  # a selection of a bigger table: the rows it names, written out
        tokens = tokens.flatten_indices()
    return tokens.data.column("input_ids")


def _documents(tokens: datasets.Dataset, order: np.ndarray | None) -> Iterator[np.ndarray]:
    """Each document's ids as a view of the memory-mapped file, in order."""
    chunks = _column(tokens).chunks
    offsets = [chunk.offsets.to_numpy() for chunk in chunks]
    values = [chunk.values.to_numpy(zero_copy_only=False) for chunk in chunks]
    if order is None:
        for off, vals in zip(offsets, values):
            for i in range(len(off) - 1):
                yield vals[off[i]:off[i + 1]]
        return
    starts = np.cumsum([0] + [len(off) - 1 for off in offsets])
    for index in order:
        c = int(np.searchsorted(starts, index, side="right")) - 1
        i = int(index) - int(starts[c])
        yield values[c][offsets[c][i]:offsets[c][i + 1]]


def _pack(documents: Iterable[np.ndarray], length: int) -> Iterator[dict[str, list]]:
    ids: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    filled = 0
    rows: dict[str, list] = {"input_ids": [], "position_ids": [], "length": []}

    def close_row() -> None:
        rows["input_ids"].append(np.concatenate(ids))
        rows["position_ids"].append(np.concatenate(positions))
        rows["length"].append(filled)

    for doc in documents:
        start = 0
        while start < len(doc):
            take = min(length - filled, len(doc) - start)
            ids.append(doc[start:start + take])
            positions.append(np.arange(take, dtype=np.int32))
            filled += take
            start += take
            if filled == length:
                close_row()
                ids, positions, filled = [], [], 0
                if len(rows["length"]) == BATCH:
                    yield rows
                    rows = {"input_ids": [], "position_ids": [], "length": []}
    if filled:
        close_row()
    if rows["length"]:
        yield rows
