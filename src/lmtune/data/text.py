"""Raw text for language modelling: documents from .txt files or text columns, and packing into rows."""

from __future__ import annotations

import codecs
import gzip
from pathlib import Path
from typing import Iterable, Iterator, Literal

import datasets

from lmtune.data.checks import apply_row_checks
from lmtune.data.errors import DataError
from lmtune.data.readers import file_key, read_table, require_columns, resolve_path

TEXT_SUFFIXES = (".txt", ".tokens", ".text")
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string"), "_row": datasets.Value("int64")})


def is_plain_text(path: str | Path) -> bool:
    name = str(path).lower().removesuffix(".gz")
    return name.endswith(TEXT_SUFFIXES)


def read_documents(path: str, column: str = "text", documents: Literal["line", "blank_line"] = "line",
                   fmt: str | None = None, on_bad_rows: str = "error", skipped: list[str] | None = None
                   ) -> datasets.Dataset:
    """Documents (columns `text`, `_row`) from a .txt file or a table's text column.

    A .txt file holds one document per line (`line`) or paragraphs separated by blank lines (`blank_line`);
    blank lines never make documents. `_row` is the line a document starts on (1-based). Rows dropped under
    on_bad_rows=skip are described in `skipped` when given."""
    file = resolve_path(path)
    if fmt is None and is_plain_text(file):
        return _stored_text(file, path, documents)
    ds = read_table(file, fmt, on_bad_rows=on_bad_rows, skipped=skipped)
    require_columns(ds, str(path), [column])

    def check(row: dict) -> tuple[str, str] | None:
        value = row[column]
        if not isinstance(value, str):
            return column, "missing text" if value is None else f"text must be a string, got {type(value).__name__}"
        return (column, "empty text") if not value.strip() else None

    ds, messages = apply_row_checks(ds, str(path), check, on_bad_rows)
    if skipped is not None:
        skipped += messages
    return ds.map(lambda b: {"text": b[column], "_row": b["_row"]}, batched=True, remove_columns=ds.column_names)


def _stored_text(file: Path, shown: str, documents: str) -> datasets.Dataset:
    """A .txt file's documents, read once into the token store's folder (named by the file's path, size and time,
    and how documents are cut) and memory-mapped from there: the file is read a line at a time, never whole."""
    from lmtune.data import store

    if not file.is_file():
        raise DataError(shown, "file not found" if not file.exists() else "is a directory, expected a text file")
    key = store.key_of("text", file_key(file), documents)
    return store.stored("text", key, TEXT_FEATURES, lambda: _text_batches(file, shown, documents))


def _text_batches(file: Path, shown: str, documents: str) -> Iterator[dict[str, list]]:
    batch: dict[str, list] = {"text": [], "_row": []}
    count = 0
    for text, row in _text_documents(file, shown, documents):
        batch["text"].append(text)
        batch["_row"].append(row)
        if len(batch["text"]) == 10_000:
            count += len(batch["text"])
            yield batch
            batch = {"text": [], "_row": []}
    if batch["text"]:
        yield batch
    elif not count:
        raise DataError(shown, "no documents (the file holds only blank lines)")


def _text_documents(file: Path, shown: str, documents: str) -> Iterator[tuple[str, int]]:
    """(document, the line it starts on), a line at a time."""
    opener = gzip.open if file.suffix == ".gz" else open
    current: list[str] = []
    start = 0
    with opener(file, "rb") as f:
        for number, raw in enumerate(f, 1):  # lines end at b"\n" only: U+2028, form feeds ... are no line ends
            bom = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0  # no text
            try:
                line = raw[bom:].decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise DataError(shown, f"not UTF-8 text ({err.reason} at byte {bom + err.start + 1} of the line)",
                                row=number, unit="line") from None
            if documents == "line":
                if line:
                    yield line, number
            elif line:
                if not current:
                    start = number
                current.append(line)
            elif current:
                yield "\n".join(current), start
                current = []
    if current:
        yield "\n".join(current), start


def pack(token_lists: Iterable[list[int]], length: int) -> list[dict[str, list[int]]]:
    """Concatenate documents (each already ending with EOS) into rows of `length` tokens.

    `position_ids` restart at 0 where a document starts (also where one continues into a new row): the
    model builds attention that never crosses a document boundary from them. The last row may be short."""
    rows: list[dict[str, list[int]]] = []
    ids: list[int] = []
    positions: list[int] = []
    for tokens in token_lists:
        start = 0
        while start < len(tokens):
            take = min(length - len(ids), len(tokens) - start)
            ids += tokens[start:start + take]
            positions += range(take)
            start += take
            if len(ids) == length:
                rows.append({"input_ids": ids, "position_ids": positions})
                ids, positions = [], []
    if ids:
        rows.append({"input_ids": ids, "position_ids": positions})
    return rows


def pack_whole(examples: list[tuple[list[int], list[int]]], length: int) -> list[dict[str, list[int]]]:
    """Labelled examples (ids, labels: conversations) packed whole into rows of at most `length` tokens, longest
    first, each into the row it fills best (best-fit decreasing, O(n log n)); `position_ids` restart at 0 where each
    example starts, and its first label is -100 (a token is never predicted from the example before it). An example
    longer than `length` gets a row of its own."""
    import bisect

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []  # example indices per row
    open_rows: list[tuple[int, int]] = []  # (room left, row), sorted: the fullest row that still fits comes first
    for i in order:
        n = len(examples[i][0])
        at = bisect.bisect_left(open_rows, (n, -1))
        if at == len(open_rows):
            rows.append([i])
            room, row = length - n, len(rows) - 1
        else:
            room, row = open_rows.pop(at)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(open_rows, (room, row))
    out = []
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            example_ids, example_labels = examples[i]
            ids += example_ids
            labels += [-100] + list(example_labels[1:])
            positions += range(len(example_ids))
        out.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return out
