"""Seeded splits (by row, stratified where possible, or by whole groups), subsets and overlap counts."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import datasets
import numpy as np

from lmtune.data.errors import DataError

logger = logging.getLogger("lmtune")


def carve_splits(
    train: datasets.Dataset,
    cfg: Any,
    seed: int,
    read: Callable[[str, str], datasets.Dataset],
    report: dict[str, Any],
    stratum: Callable[[datasets.Dataset], str | None] = lambda ds: None,
) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    """The test and validation splits of the data config ``cfg``: each read from its file (``read(name, path)``)
    or split off ``train`` (``test_size`` / ``validation_size``; by whole groups with ``split_by``, else by row,
    stratified by the column ``stratum`` names), then cut to ``max_train_samples`` / ``max_eval_samples`` rows.
    Returns what is left of ``train`` and the other splits; the rows split off are counted in ``report``."""
    splits: dict[str, datasets.Dataset] = {}
    for key, _, path, own in cfg.test_sets():  # named test sets: `test` first, then `test:<name>`
        with _reading_as(cfg, own):  # a set with columns of its own is read with them
            splits[key] = read(key, path)
    for name, path, size in (("test", cfg.test, cfg.test_size), ("validation", cfg.validation, cfg.validation_size)):
        if name == "test" and path:
            continue
        if path:
            splits[name] = read(name, path)
        elif size:
            train, splits[name] = split_off_named(train, name, size, seed, cfg.split_by, stratum(train))
            report.setdefault("split_off", {})[name] = len(splits[name])
    if cfg.max_train_samples:
        train = stratified_subset(train, cfg.max_train_samples, seed, stratum(train))
    if cfg.max_eval_samples:
        splits = {k: stratified_subset(v, cfg.max_eval_samples, seed, stratum(v)) for k, v in splits.items()}
    return train, splits


@contextlib.contextmanager
def _reading_as(cfg: Any, settings: dict[str, Any]) -> Iterator[None]:
    """`cfg` (the task's data section, which its reader reads) with `settings` for a moment."""
    before = {k: getattr(cfg, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(cfg, k, v)
        yield
    finally:
        for k, v in before.items():
            setattr(cfg, k, v)


def split_off_named(train: datasets.Dataset, name: str, size: float, seed: int, split_by: str | None = None,
                    stratify_by: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split the `name` split (test, validation) off the training data as data.<name>_size asks (a fraction, or a
    count: of groups with data.split_by, else of rows); a training set too small for it is a DataError saying so."""
    count = int(size) if size >= 1 else size
    try:
        return (split_off_groups(train, count, seed, split_by) if split_by
                else split_off(train, count, seed, stratify_by))
    except ValueError as error:
        raise DataError(f"data.{name}_size={size:g}", f"{error}: give the {name} split its own file (data.{name}) "
                                                      f"or set data.{name}_size=0") from None


def split_off(
    ds: datasets.Dataset,
    size: float | int,
    seed: int,
    stratify_by: str | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into ``(rest, split)``; ``size`` is a fraction in (0, 1) or a row count.

    Stratified by ``stratify_by`` when that column holds scalars and every class has at least 2 rows; otherwise a
    plain seeded random split, with a warning saying why. Both parts keep the original row order. The same seed
    gives the same split: the very rows scikit-learn's ``train_test_split`` picks (see ``shuffle_split``).
    """
    n = len(ds)
    n_split = _split_count(size, n)
    codes = _stratify_codes(ds, stratify_by, min_per_class=2) if stratify_by else None
    rest_idx = split_idx = None
    if codes is not None:
        try:
            rest_idx, split_idx = shuffle_split(n, n_split, seed, np.asarray(codes))
        except ValueError as e:  # e.g. fewer split rows than classes
            logger.warning("cannot stratify by %r (%s); splitting at random instead", stratify_by, e)
    if split_idx is None:
        rest_idx, split_idx = shuffle_split(n, n_split, seed)
    return ds.select(np.sort(rest_idx)), ds.select(np.sort(split_idx))


def shuffle_split(n: int, n_split: int, seed: int, codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rest, split)`` of ``n`` rows, ``n_split`` of them split off at random, in proportion to the class
    ``codes`` where given: scikit-learn's ``train_test_split(range(n), test_size=n_split, random_state=seed,
    stratify=codes)`` (its ShuffleSplit / StratifiedShuffleSplit, the same draws from the same RandomState) in numpy
    alone, so a run does not import scikit-learn (a second of start-up) for one split. Both parts unordered."""
    rng = np.random.RandomState(seed)
    n_rest = n - n_split
    if codes is None:
        order = rng.permutation(n)
        return order[n_split:], order[:n_split]
    classes, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    if counts.min() < 2:
        raise ValueError(f"classes {classes[counts < 2].tolist()} have only 1 row")
    if min(n_rest, n_split) < len(classes):
        raise ValueError(f"{min(n_rest, n_split)} row(s) on one side cannot hold all {len(classes)} classes")
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rest_counts = _approximate_mode(counts, n_rest, rng)
    split_counts = _approximate_mode(counts - rest_counts, n_split, rng)
    rest: list[int] = []
    split: list[int] = []
    for i, rows in enumerate(members):
        shuffled = rows.take(rng.permutation(counts[i]), mode="clip")
        rest.extend(shuffled[:rest_counts[i]])
        split.extend(shuffled[rest_counts[i]:rest_counts[i] + split_counts[i]])
    return rng.permutation(rest), rng.permutation(split)


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``draws`` rows to take from each class: the proportional share rounded down, then one more for
    the largest remainders, ties broken at random (scikit-learn's ``_approximate_mode``, draw for draw)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            now = min(len(tied), need)
            floored[rng.choice(tied, size=now, replace=False)] += 1
            need -= now
            if need == 0:
                break
    return floored.astype(int)


def _split_count(size: float | int, n: int, unit: str = "row") -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise ValueError(f"split size must be a fraction in (0, 1) or a {unit} count, got {size!r}")
    if n < 2:
        raise ValueError(f"cannot split a dataset of {n} {unit}(s)")
    if not isinstance(size, numbers.Integral):  # numpy scalars count too
        if not 0.0 < size < 1.0:
            raise ValueError(f"split fraction must be in (0, 1), got {size}")
        # sklearn rounds test_size up; the epsilon keeps 0.1 * 30 (= 3.0000000000000004) at 3.
        count = math.ceil(size * n - 1e-9)
    else:
        count = int(size)
    if not 1 <= count <= n - 1:
        raise ValueError(f"split size {size!r} leaves no {unit}s on one side of a dataset of {n} {unit}s")
    return count


def split_off_groups(
    ds: datasets.Dataset,
    size: float | int,
    seed: int,
    column: str,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into ``(rest, split)`` by whole groups: rows sharing a ``column`` value stay together.

    ``size`` counts groups (a fraction of them in (0, 1), or a number of groups), not rows. The groups
    are sorted by value, then ``size`` of them are drawn with ``numpy.random.default_rng(seed)``: the
    same seed and the same set of groups give the same split, whatever the row order. Both parts keep
    the original row order.
    """
    if column not in ds.column_names:
        raise ValueError(f"cannot split by {column!r}: no such column; columns are {ds.column_names}")
    values = ds.select_columns([column]).to_dict()[column]
    missing = sum(v is None for v in values)
    if missing:
        raise ValueError(f"cannot split by {column!r}: {missing} row(s) have no value")
    groups = sorted(set(values), key=lambda v: (str(type(v)), v))
    n_split = _split_count(size, len(groups), unit="group")
    chosen = {groups[i] for i in np.random.default_rng(seed).permutation(len(groups))[:n_split]}
    in_split = np.array([v in chosen for v in values])
    return ds.select(np.flatnonzero(~in_split)), ds.select(np.flatnonzero(in_split))


def group_values(ds: datasets.Dataset, column: str) -> list:
    """The distinct values of ``column`` in ``ds``, sorted (e.g. the article titles a split holds)."""
    return sorted(set(ds.select_columns([column]).to_dict()[column]), key=lambda v: (str(type(v)), v))


MAX_LISTED_GROUPS = 200  # metrics.json lists each split's groups up to this many, else counts them


def listed_groups(splits: dict[str, datasets.Dataset], column: str | None) -> dict[str, Any]:
    """The groups (data.split_by values) each split holds, for the run's data report; splits read from their own
    file without the column are left out."""
    if not column:
        return {}
    groups = {k: group_values(v, column) for k, v in splits.items() if column in v.column_names}
    return {k: g if len(g) <= MAX_LISTED_GROUPS else len(g) for k, g in groups.items()}


def stratified_subset(
    ds: datasets.Dataset,
    n: int,
    seed: int,
    stratify_by: str | None = None,
) -> datasets.Dataset:
    """A seeded sample of ``n`` rows, keeping class proportions of ``stratify_by`` where possible.

    ``n >= len(ds)`` returns ``ds`` unchanged. Class quotas are proportional (largest remainder),
    and when ``n`` is at least the number of classes every class keeps at least one row, so rare
    classes do not vanish. A column that does not hold scalars falls back to a random sample,
    with a warning. Rows keep their original order.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"subset size must be a positive row count, got {n!r}")
    n = int(n)
    if n >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    codes = _stratify_codes(ds, stratify_by, min_per_class=1) if stratify_by else None
    if codes is None:
        chosen = rng.choice(len(ds), size=n, replace=False)
    else:
        chosen = _stratified_sample(np.asarray(codes), n, rng)
    return ds.select(np.sort(chosen))


def _stratify_codes(ds: datasets.Dataset, column: str, min_per_class: int) -> list[int] | None:
    """Class code per row for stratifying, or None (after a warning) when the column cannot be used."""
    if column not in ds.column_names:
        raise ValueError(f"cannot stratify by {column!r}: no such column; columns are {ds.column_names}")
    feature = ds.features[column]
    if not isinstance(feature, (datasets.Value, datasets.ClassLabel)):
        logger.warning("cannot stratify by %r: its values are not scalars (%s); sampling at random", column, feature)
        return None
    values = ds.select_columns([column]).to_dict()[column]  # list(ds[column]) is slow in datasets 5
    code_of: dict[Hashable, int] = {}
    codes = [code_of.setdefault(v, len(code_of)) for v in values]
    counts = np.bincount(codes, minlength=len(code_of))
    if counts.min() < min_per_class:
        rare = next(v for v, c in code_of.items() if counts[c] < min_per_class)
        logger.warning(
            "cannot stratify by %r: class %r has %d row(s), fewer than %d; sampling at random",
            column, rare, int(counts[code_of[rare]]), min_per_class,
        )
        return None
    return codes


def _stratified_sample(codes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    counts = np.bincount(codes)
    quotas = _allocate(counts.tolist(), n)
    order = np.argsort(codes, kind="stable")
    groups = np.split(order, np.cumsum(counts)[:-1])
    picked = [rng.choice(group, size=q, replace=False) for group, q in zip(groups, quotas, strict=True) if q]
    return np.concatenate(picked)


def _allocate(counts: list[int], n: int) -> list[int]:
    """Split ``n`` over classes proportionally to ``counts`` (largest remainder), at least 1 each when n allows."""
    total = sum(counts)
    quotas = [n * c / total for c in counts]
    floor_one = n >= len(counts)
    alloc = [min(c, max(math.floor(q), 1 if floor_one else 0)) for c, q in zip(counts, quotas, strict=True)]
    # Too many (the floor of one row per class): take back from the classes furthest above quota.
    while sum(alloc) > n:
        donors = sorted((i for i in range(len(alloc)) if alloc[i] > 1), key=lambda i: quotas[i] - alloc[i])
        for i in donors[: sum(alloc) - n]:
            alloc[i] -= 1
    # Too few (rounding down): give to the classes with the largest remainder that still have rows.
    while sum(alloc) < n:
        takers = sorted((i for i in range(len(alloc)) if alloc[i] < counts[i]), key=lambda i: alloc[i] - quotas[i])
        for i in takers[: n - sum(alloc)]:
            alloc[i] += 1
    return alloc


def count_overlap(train_texts: list[str], other_texts: list[str]) -> int:
    """How many of ``other_texts`` also occur in ``train_texts`` (whitespace-normalised, casefolded).

    Duplicates in ``other_texts`` count each time: the number is "evaluation rows seen in training".
    """
    seen = {_normalise(t) for t in train_texts}
    return sum(_normalise(t) in seen for t in other_texts)


def _normalise(text: str) -> str:
    return " ".join(str(text).split()).casefold()
