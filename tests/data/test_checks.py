"""Tests for lmtune.data.checks: bad-row policies."""

import logging
import time

import datasets
import pytest

from lmtune.data import DataError, apply_row_checks, read_table


def _empty_text(row):
    if not (row["text"] or "").strip():
        return "text", "empty text"
    return None


@pytest.fixture
def table(tmp_path):
    # Blank line 3 makes row numbers differ from indices: bad records are on lines 2 and 5.
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": ""}\n\n{"text": "b"}\n{"text": "  "}\n{"text": "c"}\n', encoding="utf-8")
    return path, read_table(path)


def test_error_policy_reports_first_bad_row_and_count(table):
    path, ds = table
    with pytest.raises(DataError) as info:
        apply_row_checks(ds, path, _empty_text, "error")
    err = info.value
    assert (err.row, err.field) == (2, "text")
    assert str(err) == (
        f"{path}, row 2, field 'text': empty text (2 bad rows in all; set data.on_bad_rows=skip, or lmtune eval "
        "--skip-bad-rows, to drop them)"
    )


def test_skip_policy_drops_bad_rows(table, caplog):
    path, ds = table
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        kept, messages = apply_row_checks(ds, path, _empty_text, "skip")
    assert kept["text"][:] == ["a", "b", "c"]
    assert kept["_row"][:] == [1, 4, 6]
    assert messages == [f"{path}, row 2, field 'text': empty text", f"{path}, row 5, field 'text': empty text"]
    warnings = [r for r in caplog.records if r.name == "lmtune"]
    assert len(warnings) == 1 and "skipped 2 of 5 rows" in warnings[0].getMessage()


def test_clean_data_passes_through(table):
    path, ds = table
    kept, messages = apply_row_checks(ds, path, lambda row: None, "error")
    assert kept is ds and messages == []


def test_all_rows_bad_is_an_error_even_when_skipping(table):
    path, ds = table
    with pytest.raises(DataError, match=r"every row \(5\) fails the checks, the first with: nope") as info:
        apply_row_checks(ds, path, lambda row: ("text", "nope"), "skip")
    assert info.value.row == 1


def test_unknown_policy():
    ds = datasets.Dataset.from_dict({"text": ["a"]})
    with pytest.raises(ValueError, match="unknown bad-row policy 'warn'"):
        apply_row_checks(ds, "x.csv", _empty_text, "warn")


def test_without_row_column_uses_index_plus_one():
    ds = datasets.Dataset.from_dict({"text": ["a", "", "b"]})
    kept, messages = apply_row_checks(ds, "mem", _empty_text, "skip")
    assert len(kept) == 2 and messages == ["mem, row 2, field 'text': empty text"]


def test_fast_on_100k_rows():
    ds = datasets.Dataset.from_dict({"text": [("" if i % 1000 == 0 else f"t{i}") for i in range(100_000)]})
    start = time.perf_counter()
    kept, messages = apply_row_checks(ds, "big.csv", _empty_text, "skip")
    assert len(kept) == 99_900 and len(messages) == 100
    assert time.perf_counter() - start < 5
