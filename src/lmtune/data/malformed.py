"""Malformed CSV/TSV records: found by pandas, located by the line an editor shows, then raised or dropped.

A record is malformed when it has more fields than the header, or when a quote opens a field that is
never closed (so the rest of the file would be one field). The fast reading path (datasets' csv builder,
pandas' C engine) stops at the first one with pandas' wording; only then does :func:`read_malformed`
run, on the whole file in memory:

* pandas' C engine again, with ``on_bad_lines="warn"``: records with too many fields are skipped and
  reported in warnings, which we collect;
* a quote left open up to the end of the file stops pandas under any ``on_bad_lines``, and skipping its
  line with ``skiprows`` does not help (pandas still follows the quote): that line is left out of the
  text and the rest is parsed again;
* a first data record with more fields than the header is no error to pandas (it silently makes the
  extra leading fields an index): its lines are left out too.

pandas numbers lines without the line breaks inside quoted fields; Python's csv module, reading the
same text, tells on which physical line each record starts.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmtune.data.errors import SKIP_HINT, DataError

if TYPE_CHECKING:
    import pandas

__all__ = ["Malformed", "apply_policy", "read_malformed"]

logger = logging.getLogger("lmtune")

_TOO_MANY = re.compile(r"Skipping line (\d+): [Ee]xpected (\d+) fields(?: in line \d+)?, saw (\d+)")
_OPEN_QUOTE = re.compile(r"EOF inside string starting at row (\d+)")
MAX_PASSES = 20  # parses of the whole file (one more after each record left out): beyond, the file is hopeless


@dataclass
class Malformed:
    """One malformed record: the 1-based line (as an editor shows it) it starts on, and what is wrong."""

    line: int
    message: str


@dataclass
class _Record:
    """One record as Python's csv module reads it: physical lines [start, end) of the parsed text."""

    start: int
    end: int
    fields: int
    blank: bool  # pandas skips it (empty, or only spaces/tabs that are not the delimiter)


def read_malformed(real: Path, shown: str, gz: bool,
                   delimiter: str) -> tuple[pandas.DataFrame, list[int] | None, list[Malformed]]:
    """The good records of a CSV/TSV file (a DataFrame of text), their data record numbers and the bad ones (sorted
    by line). Record numbers count the data records (not the header, not blank lines), malformed ones included, as
    if the file were fixed; None where the csv module and pandas disagree on the count (numbering by position then).
    Raises DataError for a malformed header or where ``MAX_PASSES`` parses do not get past the records to leave
    out; pandas' ParserError for any other failure."""
    import pandas as pd

    opener = gzip.open if gz else open
    with opener(real, "rt", encoding="utf-8-sig", newline="") as f:  # newline="": \n, \r\n and \r end lines
        lines = f.readlines()
    left_out: set[int] = set()  # 0-based indices of the lines of records left out of the text
    dropped: list[Malformed] = []  # those records
    for _ in range(MAX_PASSES):
        kept = [i for i in range(len(lines)) if i not in left_out]
        text = "".join(lines[i] for i in kept)
        records = _records(text, delimiter, [lines[i] for i in kept])
        header = next((n for n, r in enumerate(records) if not r.blank), 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            try:
                frame = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False,
                                    na_values=[""], on_bad_lines="warn")
            except pd.errors.ParserError as e:
                match = _OPEN_QUOTE.search(str(e))
                if match is None:
                    raise
                number = int(match[1])
                start = _start(records, number)
                why = "a quote opens a field here and never closes, so the rest of the file would be inside it"
                if number == header:
                    raise DataError(shown, f"the header line is malformed: {why}", row=kept[start] + 1,
                                    unit="line") from None
                left_out.add(kept[start])
                dropped.append(Malformed(kept[start] + 1, why))
                continue
        if not isinstance(frame.index, pd.RangeIndex):
            # More fields in the first data record than in the header: pandas made the extra ones an index.
            # Leave out every record with too many fields up to the first good one (a trailing delimiter on
            # every line would otherwise take a pass per line).
            width = len(frame.columns)
            data = [r for r in records[header + 1:] if not r.blank]
            run = list(itertools.takewhile(lambda r: r.fields > width, data)) or data[:1]
            if not run:
                raise DataError(shown, "the first data row is malformed: "
                                       + _too_many(width + frame.index.nlevels, width, delimiter))
            for record in run:
                left_out.update(kept[line] for line in range(record.start, record.end))
                saw = record.fields if record.fields > width else width + frame.index.nlevels
                dropped.append(Malformed(kept[record.start] + 1, _too_many(saw, width, delimiter)))
            continue
        bad = {int(m[1]) - 1: _too_many(int(m[3]), int(m[2]), delimiter)
               for w in caught for m in _TOO_MANY.finditer(str(w.message))}  # one warning can list several
        return frame, *_number(records, header, kept, bad, dropped, len(frame))
    first = min(dropped, key=lambda m: m.line)
    raise DataError(shown, f"{first.message} (one of {len(dropped)} or more malformed rows: are the header line and "
                           "the delimiter right?)", row=first.line, unit="line")


def _too_many(saw: int, expected: int, delimiter: str) -> str:
    what = "tab" if delimiter == "\t" else repr(delimiter)
    return f"{saw} fields where the header has {expected}; is a {what} inside a field not quoted?"


def _records(text: str, delimiter: str, lines: list[str]) -> list[_Record]:
    """Where each record pandas counts (blank lines too) starts and ends, by the csv module."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a quote left open makes one huge field
    records: list[_Record] = []
    ws = " \t".replace(delimiter, "")
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        start = 0
        for row in reader:
            end = reader.line_num
            blank = end - start == 1 and not lines[start].rstrip("\r\n").strip(ws)
            records.append(_Record(start, end, len(row), blank))
            start = end
    except csv.Error:
        pass  # the records read so far still place everything before the failure
    finally:
        csv.field_size_limit(limit)
    return records


def _start(records: list[_Record], number: int) -> int:
    """The physical line (0-based) where pandas' record ``number`` (0-based, counting blank lines) starts."""
    if number < len(records):
        return records[number].start
    last = records[-1].end if records else 0
    return last + number - len(records)  # past what the csv module read: assume one line per record


def _number(records: list[_Record], header: int, kept: list[int], bad: dict[int, str],
            dropped: list[Malformed], n_good: int) -> tuple[list[int] | None, list[Malformed]]:
    """Data record numbers of the good records, and the malformed records in line order."""
    malformed = [Malformed(kept[_start(records, n)] + 1, why) for n, why in bad.items()]
    malformed += dropped
    malformed.sort(key=lambda m: m.line)
    good = [kept[r.start] for n, r in enumerate(records) if n > header and not r.blank and n not in bad]
    if len(good) != n_good:
        return None, malformed
    starts = sorted([(line, True) for line in good] + [(m.line - 1, False) for m in malformed])
    return [number for number, (_, is_good) in enumerate(starts, start=1) if is_good], malformed


def apply_policy(shown: str, malformed: list[Malformed], n_good: int, policy: str) -> list[str]:
    """data.on_bad_rows for malformed records: raise for the first ("error") or describe each ("skip").

    Returns one message per skipped record (a DataError's text, like skipped rows that fail checks).
    Every record being malformed is an error under either policy.
    """
    first = malformed[0]
    if n_good == 0:
        message = f"every row ({len(malformed)}) is malformed, the first with: {first.message}"
        raise DataError(shown, message, row=first.line, unit="line")
    if policy == "error":
        plural = "row" if len(malformed) == 1 else "rows"
        hint = f"({len(malformed)} malformed {plural} in all; {SKIP_HINT})"
        raise DataError(shown, f"{first.message} {hint}", row=first.line, unit="line")
    errors = [DataError(shown, m.message, row=m.line, unit="line") for m in malformed]
    logger.warning("%s: skipped %d of %d rows that are malformed; first: %s", shown, len(malformed),
                   len(malformed) + n_good, errors[0])
    return [str(e) for e in errors]
