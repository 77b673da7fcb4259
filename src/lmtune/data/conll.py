"""Token-tagged data for NER: CoNLL column files and JSONL tokens/tags, checked and converted to BIO tags."""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from lmtune.data import store
from lmtune.data.errors import DataError
from lmtune.data.readers import ROW_COLUMN, read_table, require_columns, resolve_path

log = logging.getLogger("lmtune")

SCHEMES = ("bio", "iob1", "bioes")
TABLE_FORMATS = ("jsonl", "json", "parquet")  # records holding a token list and a tag list
_TAG = re.compile(r"^(?:O|([A-Z])-(.+))$")
_PREFIXES = {"bio": "BI", "iob1": "BI", "bioes": "BIES"}


class TagError(ValueError):
    """A tag sequence problem at token `index` of a sentence (the caller knows the file and line)."""

    def __init__(self, index: int, message: str) -> None:
        self.index = index
        super().__init__(message)


def _parse_tag(tag: Any, scheme: str, index: int) -> tuple[str, str | None]:
    if not isinstance(tag, str):
        raise TagError(index, f"tag must be a string, got {type(tag).__name__} {tag!r}")
    match = _TAG.match(tag)
    if match is None or (match.group(1) and match.group(1) not in _PREFIXES[scheme]):
        expected = "O, " + ", ".join(f"{p}-TYPE" for p in _PREFIXES[scheme])
        hint = "; set task.tag_scheme=bioes" if match and match.group(1) in "ES" else ""
        raise TagError(index, f"invalid tag {tag!r} for the {scheme} scheme (expected {expected}){hint}")
    return (match.group(1), match.group(2)) if match.group(1) else ("O", None)


def to_bio(tags: list[Any], scheme: str) -> list[str]:
    """Check `tags` under `scheme` (bio, iob1 or bioes) and return them as BIO (IOB2) tags.

    IOB1 (the original CoNLL-2003) starts an entity with I- and uses B- only between two adjacent
    entities of one type, so an I- that does not continue its type becomes B-. BIO requires every
    entity to start with B-. BIOES entities are B..E or S; E becomes I-, S becomes B-.
    Raises TagError at the first token that breaks the scheme.
    """
    parsed = [_parse_tag(tag, scheme, i) for i, tag in enumerate(tags)]
    bio: list[str] = []
    prev_prefix, prev_type = "O", None
    for i, (prefix, kind) in enumerate(parsed):
        if prefix == "O":
            bio.append("O")
        elif prefix in ("B", "S"):
            bio.append(f"B-{kind}")
        elif prev_type == kind and prev_prefix in ("B", "I"):
            bio.append(f"I-{kind}")
        elif scheme == "iob1" and prefix == "I":
            bio.append(f"B-{kind}")
        elif prev_type is not None and prev_prefix in ("B", "I"):
            raise TagError(i, f"{tags[i]} follows {tags[i - 1]}: the entity type changes without "
                              f"B-{kind} ({scheme.upper()} starts every entity with B-)")
        else:
            hint = ("; files in IOB1 (such as the original CoNLL-2003) need task.tag_scheme=iob1"
                    if scheme == "bio" else "")
            raise TagError(i, f"{tags[i]} starts an entity without B-{kind} ({scheme.upper()} starts every "
                              f"entity with B-){hint}")
        if scheme == "bioes" and prefix in ("B", "I"):
            following = parsed[i + 1] if i + 1 < len(parsed) else None
            if following is None:
                raise TagError(i, f"{tags[i]} ends the sentence: a BIOES entity ends with E-{kind}")
            if following[0] not in ("I", "E") or following[1] != kind:
                raise TagError(i + 1, f"{tags[i + 1]} after {tags[i]}: a BIOES entity continues with "
                                      f"I-{kind} or E-{kind}")
        prev_prefix, prev_type = prefix, kind
    return bio


def tag_types(tags: list[str]) -> set[str]:
    return {tag[2:] for tag in tags if tag != "O"}


@dataclass
class _Sentence:
    tokens: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the file line of every token
    problem: DataError | None = None  # the first line-level problem while parsing
    group: Any = None  # the value of the split_by field (CoNLL files: the -DOCSTART- document number)


@dataclass
class NerReadOptions:
    """How to read one NER file (from the task's options and the data section)."""

    scheme: str = "bio"
    token_column: int = 0
    tag_column: int = -1
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    format: str | None = None  # None: JSONL/JSON/Parquet by extension, anything else a CoNLL column file
    on_bad_rows: str = "error"
    types: set[str] | None = None  # entity types allowed (those of the training data); None: any
    group_field: str | None = None  # keep this field (data.split_by); "document" in CoNLL files


def read_ner(path: str | Path, opts: NerReadOptions) -> tuple[datasets.Dataset, int, list[str]]:
    """Read a CoNLL column file or JSONL/JSON/Parquet records into sentences with BIO tags.

    Returns a dataset with columns tokens, tags (BIO), _row (the line, or record, that starts the
    sentence) and the group field if asked for, the number of sentences skipped under
    data.on_bad_rows=skip, and their messages.
    Every problem is a DataError naming the file and the line (record for JSON arrays, Parquet).
    """
    shown = str(path)
    real = resolve_path(path)
    # A Hub dataset's split (hf:ORG/NAME:SPLIT; a local file of that name wins) holds records, like a table file.
    kind = "hub" if shown.startswith("hf:") and not real.exists() else _table_kind(real, opts.format)
    if kind is None and opts.group_field not in (None, "document"):
        raise DataError(shown, f"data.split_by={opts.group_field!r}: sentences of a CoNLL file can only be grouped "
                               "by 'document' (the -DOCSTART- documents)")
    if kind is None:
        sentences, unit = _read_conll(real, shown, opts), "line"
    else:
        sentences, unit = _read_records(shown, kind, opts), "line" if kind == "jsonl" else "row"
    where = None if kind is None else opts.tags_field  # the field to name: records have fields, lines don't
    for sentence in sentences:
        if sentence.problem is None:
            sentence.problem = _check_tags(sentence, shown, opts, unit, where)
    kept, messages = _apply_policy(sentences, shown, opts.on_bad_rows)
    columns = {"tokens": [s.tokens for s in kept], "tags": [s.tags for s in kept],
               ROW_COLUMN: [s.lines[0] if s.lines else 0 for s in kept]}
    if opts.group_field:
        columns[opts.group_field] = [s.group for s in kept]
    ds = store.on_disk(datasets.Dataset.from_dict(columns))
    return ds, len(sentences) - len(kept), messages


def _table_kind(real: Path, fmt: str | None) -> str | None:
    if fmt is not None:
        if fmt in TABLE_FORMATS:
            return fmt
        if fmt == "tsv":
            return None  # one token per line: the CoNLL column reader takes any whitespace
        raise DataError(str(real), f"NER cannot read format {fmt!r}: give CoNLL column files or "
                                   f"{', '.join(TABLE_FORMATS)} records with token and tag lists")
    suffixes = [s.lower() for s in real.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    return ext if ext in TABLE_FORMATS else None


def _lines(real: Path, shown: str):
    """(line number, text) of a UTF-8 text file, optionally gzipped; undecodable bytes name their line."""
    if not real.exists():
        where = "" if real.is_absolute() else f" (looked at {real.resolve()})"
        raise DataError(shown, f"file not found{where}")
    if real.is_dir():
        raise DataError(shown, "is a directory, expected a data file")
    opener = gzip.open if real.suffix.lower() == ".gz" else open
    with opener(real, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(shown, f"not valid UTF-8 (byte 0x{raw[e.start:e.start + 1].hex()}); save the file "
                                       "as UTF-8", row=number, unit="line") from None


def _read_conll(real: Path, shown: str, opts: NerReadOptions) -> list[_Sentence]:
    """Sentences of a column file: one token per line, blank lines between sentences, -DOCSTART- skipped."""
    sentences, current, document = [], _Sentence(group=0), 0
    width = first_line = None
    token_col = tag_col = 0
    for number, line in _lines(real, shown):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if current.tokens or current.problem:
                sentences.append(current)
            document += bool(columns)
            current = _Sentence(group=document)
            continue
        if width is None:  # the first token line fixes the columns every other line must have
            width, first_line = len(columns), number
            token_col, tag_col = _resolve_columns(width, shown, number, opts)
        if len(columns) != width:
            if current.problem is None:
                message = (f"{len(columns)} column(s) where line {first_line} has {width}: every token line "
                           "needs a token and a tag (columns separated by whitespace)")
                current.problem = DataError(shown, message, row=number, unit="line")
            current.lines.append(number)
            continue
        current.tokens.append(columns[token_col])
        current.tags.append(columns[tag_col])
        current.lines.append(number)
    if current.tokens or current.problem:
        sentences.append(current)
    if not sentences:
        raise DataError(shown, "no sentences (an empty file, or only blank and -DOCSTART- lines)")
    return sentences


def _resolve_columns(width: int, shown: str, line: int, opts: NerReadOptions) -> tuple[int, int]:
    if width < 2:
        raise DataError(shown, "one column only: a CoNLL token line holds a token and a tag", row=line, unit="line")
    resolved = []
    for name, index in (("token_column", opts.token_column), ("tag_column", opts.tag_column)):
        if not -width <= index < width:
            raise DataError(shown, f"task.{name}={index} but the file has {width} columns", row=line, unit="line")
        resolved.append(index % width)
    if resolved[0] == resolved[1]:
        raise DataError(shown, f"task.token_column={opts.token_column} and task.tag_column={opts.tag_column} "
                               f"name the same column of {width}", row=line, unit="line")
    return resolved[0], resolved[1]


def _read_records(shown: str, kind: str, opts: NerReadOptions) -> list[_Sentence]:
    """Sentences of JSONL/JSON/Parquet records or a Hub dataset's rows {tokens: [...], tags: [...]}; shape problems
    per record. Tags stored as class numbers (a Hub dataset's ClassLabel, as CoNLL-2003's `ner_tags`) are read as
    their names."""
    ds = read_table(shown, None if kind == "hub" else kind)
    fields = [opts.tokens_field, opts.tags_field] + ([opts.group_field] if opts.group_field else [])
    require_columns(ds, shown, fields, {opts.tokens_field: "the token list (task.tokens_field)",
                                        opts.tags_field: "the tag list (task.tags_field)",
                                        opts.group_field: "the group to split by (data.split_by)"})
    unit = "line" if kind == "jsonl" else "row"
    names = getattr(getattr(ds.features[opts.tags_field], "feature", None), "names", None)  # ClassLabel names
    sentences = []
    for row in ds.select_columns(fields + [ROW_COLUMN]).iter(batch_size=1000):
        if names:
            row[opts.tags_field] = [[names[t] for t in tags] if isinstance(tags, list) else tags
                                    for tags in row[opts.tags_field]]
        groups = row[opts.group_field] if opts.group_field else [None] * len(row[ROW_COLUMN])
        for tokens, tags, number, group in zip(row[opts.tokens_field], row[opts.tags_field], row[ROW_COLUMN], groups):
            sentence = _Sentence(lines=[number], group=group)
            problem = _record_problem(tokens, tags, opts)
            if problem is not None:
                sentence.problem = DataError(shown, problem[1], row=number, field=problem[0], unit=unit)
            else:
                sentence.tokens, sentence.tags, sentence.lines = list(tokens), list(tags), [number] * len(tokens)
            sentences.append(sentence)
    return sentences


def _record_problem(tokens: Any, tags: Any, opts: NerReadOptions) -> tuple[str, str] | None:
    for name, value in ((opts.tokens_field, tokens), (opts.tags_field, tags)):
        if not isinstance(value, list):
            return name, f"expected a list, got {type(value).__name__}"
    if not tokens:
        return opts.tokens_field, "empty sentence (no tokens)"
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token.strip():
            return opts.tokens_field, f"token {i} is empty or not a string ({token!r})"
    if len(tokens) != len(tags):
        return opts.tags_field, f"{len(tokens)} tokens but {len(tags)} tags"
    return None


def _check_tags(sentence: _Sentence, shown: str, opts: NerReadOptions, unit: str,
                where: str | None) -> DataError | None:
    """Convert a sentence's tags to BIO in place; a located DataError for the first bad tag."""
    try:
        bio = to_bio(sentence.tags, opts.scheme)
    except TagError as e:
        hint = " (is task.tag_column the tag column?)" if where is None and "invalid tag" in str(e) else ""
        return DataError(shown, f"{e}{hint}", row=sentence.lines[e.index], unit=unit, field=where)
    if opts.types is not None:
        unknown = sorted(tag_types(bio) - opts.types)
        if unknown:
            at = next(i for i, tag in enumerate(bio) if tag[2:] == unknown[0])
            known = ", ".join(sorted(opts.types)) or "none"
            return DataError(shown, f"entity type {unknown[0]!r} does not occur in the training data (types: "
                                    f"{known}); list it in data.labels to keep it", row=sentence.lines[at], unit=unit,
                             field=where)
    sentence.tags = bio
    return None


def _apply_policy(sentences: list[_Sentence], shown: str, policy: str) -> tuple[list[_Sentence], list[str]]:
    """data.on_bad_rows for sentences: raise for the first bad one ("error") or drop them ("skip")."""
    bad = [s.problem for s in sentences if s.problem is not None]
    if not bad:
        return sentences, []
    first = bad[0]
    if len(bad) == len(sentences):
        raise DataError(shown, f"every sentence ({len(sentences)}) is bad, the first: {first.message}",
                        row=first.row, field=first.field, unit=first.unit)
    if policy == "error":
        plural = "sentence" if len(bad) == 1 else "sentences"
        raise DataError(shown, f"{first.message} ({len(bad)} bad {plural} in all; set data.on_bad_rows=skip "
                               "to drop them)", row=first.row, field=first.field, unit=first.unit)
    log.warning("%s: skipped %d of %d sentences that failed checks; first: %s", shown, len(bad), len(sentences), first)
    return [s for s in sentences if s.problem is None], [str(e) for e in bad]
