"""Reading extractive QA data: SQuAD v1.1/v2.0 JSON (nested, optionally .gz) and flat JSONL/JSON/Parquet rows."""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from pathlib import Path
from typing import Any

import datasets

from lmtune.data.checks import apply_row_checks
from lmtune.data import store
from lmtune.data.errors import DataError
from lmtune.data.readers import ROW_COLUMN, read_table, resolve_path

log = logging.getLogger("lmtune")

# The columns every QA dataset has after reading, whatever the file looked like.
COLUMNS = ("id", "title", "question", "context", "answer_texts", "answer_starts", "is_impossible")
_PROBLEM, _FIELD = "_problem", "_problem_field"
_KEYS = "_keys"  # a nested file's question: the keys it has


def read_squad(path: str | Path, fmt: str | None = None, *, on_bad_rows: str = "error",
               allow_impossible: bool = True, keep: tuple[str, ...] = ()) -> tuple[datasets.Dataset, list[str]]:
    """Read and check a QA file; returns one row per question and the messages of skipped rows.

    Formats: the official SQuAD JSON (`{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
    "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}`, v1.1 or v2.0), or one
    record per question (JSONL, a JSON array, Parquet) with `id`, `question`, `context`, `answers` as
    `{"text": [...], "answer_start": [...]}` (or a list of `{"text", "answer_start"}`), and optionally
    `title` and `is_impossible` (default: true when there are no answers). Each may be gzipped.

    Every answer must be found at its `answer_start` in the context (character offsets); a row that
    breaks a rule is an error naming file, row, field and question id, or is dropped under
    on_bad_rows="skip". Rows are numbered by line for JSONL and by question (in file order) for the
    nested JSON. `keep` names further columns of flat files to carry along (e.g. data.split_by).
    """
    shown = str(path)
    nested = _read_nested(resolve_path(path), shown, fmt)
    malformed: list[str] = []  # rows of a CSV/TSV file skipped as malformed
    if nested is None:
        ds = read_table(path, fmt, on_bad_rows=on_bad_rows, skipped=malformed)
        # Answers may be left out only where the file says which questions are unanswerable (SQuAD v2 style).
        answers = () if "answers" in ds.column_names or "is_impossible" in ds.column_names else ("answers",)
        missing = [c for c in ("question", "context", *answers, *keep) if c not in ds.column_names]
        if missing:
            have = ", ".join(repr(c) for c in ds.column_names if c != ROW_COLUMN)
            raise DataError(shown, f"no column {missing[0]!r}; a QA file needs 'question', 'context' and "
                                   f"'answers' (the file has: {have})", field=missing[0])
        raw = ds.to_list()
    else:
        raw = nested
        unknown = [c for c in keep if c not in ("title", "context", "id", "question")]
        if unknown:
            raise DataError(shown, f"no field {unknown[0]!r} in SQuAD JSON (it has title, context, id, question)",
                            field=unknown[0])
    rows = [_canonical(r, allow_impossible, keep) for r in raw]
    ds = datasets.Dataset.from_list(rows, features=_features(keep))
    ds, skipped = apply_row_checks(ds, shown, lambda r: (r[_FIELD], r[_PROBLEM]) if r[_PROBLEM] else None,
                                   on_bad_rows)
    return store.on_disk(ds.remove_columns([_PROBLEM, _FIELD])), malformed + skipped


def _features(keep: tuple[str, ...]) -> datasets.Features:
    # Declared, not inferred: a file whose questions are all unanswerable has no answer to infer from.
    text = datasets.Value("string")
    columns = {ROW_COLUMN: datasets.Value("int64"), "id": text, "title": text, "question": text, "context": text,
               "answer_texts": datasets.List(text), "answer_starts": datasets.List(datasets.Value("int64")),
               "is_impossible": datasets.Value("bool"), _FIELD: text, _PROBLEM: text}
    return datasets.Features({**columns, **{k: text for k in keep if k not in columns}})


def _open_text(path: Path) -> Any:
    is_gz = path.suffix.lower() == ".gz"
    return gzip.open(path, "rt", encoding="utf-8-sig") if is_gz else open(path, encoding="utf-8-sig")


def _read_nested(path: Path, shown: str, fmt: str | None) -> list[dict[str, Any]] | None:
    """The questions of an official SQuAD JSON file, or None when the file holds flat records."""
    name = path.name.lower().removesuffix(".gz")
    if fmt not in (None, "json") or not name.endswith(".json") or not path.is_file():
        return None  # read_table reports missing files and other formats
    try:
        with _open_text(path) as f:
            head = f.read(4096).lstrip()
            if not head.startswith("{"):
                return None
            f.seek(0)
            data = json.load(f)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line: flat records
            return None
        raise DataError(shown, f"not valid JSON: {e.msg} (column {e.colno})", row=e.lineno, unit="line") from None
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(shown, f"cannot read as UTF-8 JSON: {e}") from None
    if not isinstance(data, dict) or "data" not in data:
        return None
    return _flatten(data, shown)


def _flatten(data: dict[str, Any], shown: str) -> list[dict[str, Any]]:
    if not isinstance(data["data"], list):
        raise DataError(shown, "'data' must be a list of articles", field="data")
    rows: list[dict[str, Any]] = []
    for a, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(shown, f"article {a + 1} has no list of 'paragraphs'", field="paragraphs")
        for p, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                raise DataError(shown, f"article {a + 1}, paragraph {p + 1} has no list of 'qas'", field="qas")
            for qa in qas:
                qa = qa if isinstance(qa, dict) else {}
                rows.append({ROW_COLUMN: len(rows) + 1, "title": article.get("title"),
                             "context": paragraph.get("context"), "id": qa.get("id"),
                             "question": qa.get("question"), "is_impossible": qa.get("is_impossible"),
                             **({"answers": qa["answers"]} if "answers" in qa else {}),
                             _KEYS: sorted(qa)})
    if not rows:
        raise DataError(shown, "no questions in the file")
    return rows


def _answer_pairs(value: Any) -> list[tuple[Any, Any]] | str:
    """(text, answer_start) pairs from either answers layout, or a message saying what is wrong."""
    if value is None:
        return []
    if isinstance(value, dict):
        texts, starts = value.get("text") or [], value.get("answer_start") or []
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            return "'text' and 'answer_start' must be lists of the same length"
        return list(zip(texts, starts))
    if isinstance(value, list) and all(isinstance(a, dict) for a in value):
        return [(a.get("text"), a.get("answer_start")) for a in value]
    return f"expected a list of {{text, answer_start}} or {{text: [...], answer_start: [...]}}, got {value!r:.60}"


def _check_answer(context: str, number: int, text: Any, start: Any) -> str | None:
    if not isinstance(text, str) or not text:
        return f"answer {number} has no text"
    if isinstance(start, float) and start.is_integer():
        start = int(start)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        return f"answer {number}: answer_start must be a character offset (an integer >= 0), got {start!r}"
    found = context[start:start + len(text)]
    if found == text:
        return None
    elsewhere = context.find(text)
    where = f"it occurs at {elsewhere}" if elsewhere >= 0 else "it does not occur in the context"
    return (f"answer {number} {text!r:.80} is not at answer_start {start} "
            f"(the context there reads {found!r:.80}; {where})")


def _canonical(raw: dict[str, Any], allow_impossible: bool, keep: tuple[str, ...]) -> dict[str, Any]:
    """One question in the common layout, with the first problem found (field, message) or empty ones."""
    row_id = raw.get("id")
    row = {ROW_COLUMN: raw[ROW_COLUMN], "id": str(row_id) if row_id is not None else str(raw[ROW_COLUMN]),
           "title": str(raw.get("title") or ""), "question": raw.get("question"), "context": raw.get("context"),
           "answer_texts": [], "answer_starts": [], "is_impossible": False, _FIELD: "", _PROBLEM: ""}
    # Extra columns (a data.split_by group) as text: a group is compared for equality only.
    row.update({k: None if raw.get(k) is None else str(raw[k]) for k in keep if k not in row})

    def bad(field: str, message: str) -> dict[str, Any]:
        row.update({"question": str(row["question"] or ""), "context": str(row["context"] or ""),
                    "answer_texts": [], "answer_starts": [], _FIELD: field,
                    _PROBLEM: f"{message} (question id {row['id']!r})"})
        return row

    for field in ("question", "context"):
        value = row[field]
        if not isinstance(value, str) or not value.strip():
            return bad(field, f"empty {field}" if value is None or isinstance(value, str)
                       else f"{field} must be a string, got {type(value).__name__}")
    if _KEYS in raw and "answers" not in raw and raw.get("is_impossible") is None:
        return bad("answers", f"no 'answers' (the question has: {', '.join(raw[_KEYS])})")
    pairs = _answer_pairs(raw.get("answers"))
    if isinstance(pairs, str):
        return bad("answers", pairs)
    impossible = raw.get("is_impossible")
    impossible = not pairs if impossible is None else impossible
    if not isinstance(impossible, bool):
        return bad("is_impossible", f"is_impossible must be true or false, got {impossible!r}")
    if impossible and pairs:
        return bad("answers", "is_impossible is true but answers are given")
    if impossible and not allow_impossible:
        return bad("answers", "no answer (an unanswerable question); set task.version_2=true for SQuAD v2.0-style data")
    if not impossible and not pairs:
        return bad("answers", "no answers (mark unanswerable questions with is_impossible: true)")
    for number, (text, start) in enumerate(pairs, 1):
        problem = _check_answer(row["context"], number, text, start)
        if problem:
            return bad("answers", problem)
    row.update(answer_texts=[t for t, _ in pairs], answer_starts=[int(s) for _, s in pairs], is_impossible=impossible)
    return row
