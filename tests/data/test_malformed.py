"""Malformed CSV/TSV records (too many fields, a quote never closed): located by editor line, raised or skipped."""

import gzip
import logging

import pytest

from lmtune.data import DataError, read_table

# Line 2 holds a quoted field spanning lines 2-3 and line 4 is blank, so pandas' own numbering
# ("line 5") and the record number (3) both differ from the line an editor shows: 6.
TEXT = 'text,label\n"two\nlines",1\n\nb,2\nc,3,extra\nd,4\n'


def _write(path, text):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def _tsv(text):
    return text.replace(",", "\t")


@pytest.mark.parametrize("name", ["d.csv", "d.csv.gz", "d.tsv", "d.tsv.gz"])
def test_extra_fields_name_file_and_editor_line(tmp_path, name):
    path = _write(tmp_path / name, _tsv(TEXT) if ".tsv" in name else TEXT)
    with pytest.raises(DataError) as info:
        read_table(path)
    err = info.value
    assert (err.path, err.row, err.unit) == (str(path), 6, "line")
    what = "tab" if ".tsv" in name else "','"
    assert str(err) == (f"{path}, line 6: 3 fields where the header has 2; is a {what} inside a field not quoted? "
                        "(1 malformed row in all; set data.on_bad_rows=skip, or lmtune eval --skip-bad-rows, to "
                        "drop them)")


def test_unterminated_quote_names_its_line(tmp_path):
    path = _write(tmp_path / "d.csv", 'text,label\na,1\n\n"b,2\nc,3\nd,4,x\n')
    with pytest.raises(DataError) as info:
        read_table(path)
    err = info.value
    assert (err.row, err.unit) == (4, "line")
    assert "a quote opens a field here and never closes" in err.message
    assert "2 malformed rows in all; set data.on_bad_rows=skip" in err.message  # line 6 too


@pytest.mark.parametrize("name", ["d.csv", "d.tsv.gz"])
def test_skip_drops_malformed_rows_and_reports_them(tmp_path, name, caplog):
    text = TEXT + '"e,5\nf,6\n'  # and an unterminated quote on line 8: only that line goes
    path = _write(tmp_path / name, _tsv(text) if ".tsv" in name else text)
    skipped = []
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        ds = read_table(path, on_bad_rows="skip", skipped=skipped)
    assert ds["text"][:] == ["two\nlines", "b", "d", "f"]
    assert ds["label"][:] == ["1", "2", "4", "6"]
    assert ds["_row"][:] == [1, 2, 4, 6]  # the skipped records keep their numbers (3 and 5)
    assert [s.split(": ")[0] for s in skipped] == [f"{path}, line 6", f"{path}, line 8"]
    assert "never closes" in skipped[1]
    warnings = [r.getMessage() for r in caplog.records if r.name == "lmtune"]
    assert len(warnings) == 1 and f"{path}: skipped 2 of 6 rows that are malformed" in warnings[0]


def test_skip_reads_what_the_fixed_file_holds(tmp_path):
    rows = [f"review {i},{i % 3},{i / 4}" for i in range(50)]
    fixed = _write(tmp_path / "fixed.csv", "text,label,score\n" + "\n".join(rows) + "\n")
    rows.insert(20, "broken, unquoted,1,0.5")
    broken = _write(tmp_path / "broken.csv", "text,label,score\n" + "\n".join(rows) + "\n")
    skipped = []
    got, want = read_table(broken, on_bad_rows="skip", skipped=skipped), read_table(fixed)
    assert got.features == want.features
    assert got.remove_columns("_row").to_list() == want.remove_columns("_row").to_list()
    assert got["_row"][:] == [*range(1, 21), *range(22, 52)]
    assert skipped == [f"{broken}, line 22: 4 fields where the header has 3; is a ',' inside a field not quoted?"]


def test_first_row_with_extra_fields_is_malformed_not_an_index(tmp_path):
    # pandas would silently take the extra leading field as the row index and shift every column.
    path = _write(tmp_path / "d.csv", "text,label\nx,y,1\nb,2\n")
    with pytest.raises(DataError, match=r"d\.csv, line 2: 3 fields where the header has 2") as info:
        read_table(path)
    assert info.value.row == 2
    ds = read_table(path, on_bad_rows="skip")
    assert ds.to_list() == [{"text": "b", "label": "2", "_row": 2}]
    trailing = _write(tmp_path / "t.csv", "text,label\n" + "".join(f"r{i},{i},\n" for i in range(500)))
    with pytest.raises(DataError, match=r"t\.csv, line 2: every row \(500\) is malformed, the first with: 3 fields"):
        read_table(trailing)  # a delimiter ending every line: one error, not 500 passes over the file


def test_malformed_header_or_every_row_is_an_error_even_when_skipping(tmp_path):
    header = _write(tmp_path / "h.csv", '"text,label\na,1\n')
    with pytest.raises(DataError, match=r"h\.csv, line 1: the header line is malformed: a quote opens"):
        read_table(header, on_bad_rows="skip")
    every = _write(tmp_path / "e.csv", "text,label\n\na,1,2\nb,2,3\n")
    with pytest.raises(DataError, match=r"e\.csv, line 3: every row \(2\) is malformed, the first with: 3 fields"):
        read_table(every, on_bad_rows="skip")


def test_clean_file_skips_nothing(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\na,1\nb,2\n")
    skipped = []
    ds = read_table(path, on_bad_rows="skip", skipped=skipped)
    assert len(ds) == 2 and skipped == []
    with pytest.raises(ValueError, match="unknown bad-row policy 'warn'"):
        read_table(path, on_bad_rows="warn")


def test_every_malformed_line_counts_and_keeps_later_row_numbers(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\na,1\nb,2,x\nc,3\nd,4,y\ne,5\n")
    with pytest.raises(DataError, match=r"line 3: .*\(2 malformed rows in all"):
        read_table(path)
    skipped = []
    ds = read_table(path, on_bad_rows="skip", skipped=skipped)
    assert ds["text"][:] == ["a", "c", "e"] and ds["_row"][:] == [1, 3, 5]
    assert len(skipped) == 2 and "line 5" in skipped[1]
