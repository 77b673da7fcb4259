"""Tests for lmtune.data.splits: stratified splits, group splits, subsets, overlap counts."""

import logging
from collections import Counter

import datasets
import pytest

from lmtune.data import count_overlap, group_values, split_off, split_off_groups, stratified_subset
from lmtune.data.splits import shuffle_split


def _table(counts: dict[str, int]) -> datasets.Dataset:
    labels = [label for label, n in counts.items() for _ in range(n)]
    # Interleave the classes so a split that ignored labels would not hit the proportions by luck.
    labels = labels[::2] + labels[1::2]
    return datasets.Dataset.from_dict({"label": labels, "_row": list(range(1, len(labels) + 1))})


def _counts(ds) -> Counter:
    return Counter(ds["label"][:])


def test_stratified_split_keeps_proportions():
    ds = _table({"a": 80, "b": 20})
    for seed in range(5):
        rest, split = split_off(ds, 0.25, seed=seed, stratify_by="label")
        assert len(split) == 25 and len(rest) == 75
        assert abs(_counts(split)["a"] - 20) <= 1 and abs(_counts(split)["b"] - 5) <= 1
        rows_rest, rows_split = rest["_row"][:], split["_row"][:]
        assert sorted(rows_rest + rows_split) == list(range(1, 101))
        assert rows_split == sorted(rows_split)  # original order kept


@pytest.mark.parametrize("stratified", [False, True])
def test_shuffle_split_picks_the_rows_sklearn_picks(stratified):
    """The numpy split is scikit-learn's train_test_split draw for draw (so splits did not change when the import
    went), over class counts with ties in their remainders, tiny classes, fractions and counts."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    cases = 0
    for trial in range(60):
        rng = np.random.default_rng(trial)
        k = int(rng.integers(2, 7))
        counts = rng.integers(2, 40, size=k) if trial % 3 else np.full(k, int(rng.integers(2, 12)))  # ties
        codes = np.repeat(np.arange(k), counts)
        rng.shuffle(codes)
        n = len(codes)
        n_split = int(rng.integers(k, n - k + 1))
        seed = int(rng.integers(0, 2**31 - 1))
        ours = shuffle_split(n, n_split, seed, codes if stratified else None)
        theirs = train_test_split(np.arange(n), test_size=n_split, random_state=seed,
                                  stratify=codes if stratified else None)
        assert [a.tolist() for a in ours] == [b.tolist() for b in theirs], (trial, counts, n_split, seed)
        cases += 1
    assert cases == 60


def test_shuffle_split_refuses_what_it_cannot_stratify():
    import numpy as np

    with pytest.raises(ValueError, match="only 1 row"):
        shuffle_split(5, 2, 0, np.array([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match="cannot hold all 3 classes"):
        shuffle_split(9, 2, 0, np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]))


def test_split_is_deterministic_per_seed():
    ds = _table({"a": 80, "b": 20})
    first = split_off(ds, 10, seed=3, stratify_by="label")[1]["_row"][:]
    again = split_off(ds, 10, seed=3, stratify_by="label")[1]["_row"][:]
    other = split_off(ds, 10, seed=4, stratify_by="label")[1]["_row"][:]
    assert first == again and first != other
    assert len(first) == 10


def test_split_falls_back_when_a_class_has_one_row(caplog):
    ds = _table({"a": 50, "b": 49, "c": 1})
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        rest, split = split_off(ds, 0.2, seed=0, stratify_by="label")
    assert (len(rest), len(split)) == (80, 20)
    assert "class 'c' has 1 row(s)" in caplog.text and "at random" in caplog.text


def test_split_falls_back_for_non_scalar_column(caplog):
    ds = datasets.Dataset.from_dict({"tags": [[i % 2] for i in range(10)]})
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        rest, split = split_off(ds, 3, seed=0, stratify_by="tags")
    assert (len(rest), len(split)) == (7, 3)
    assert "not scalars" in caplog.text


def test_split_falls_back_when_split_smaller_than_class_count(caplog):
    ds = _table({"a": 10, "b": 10, "c": 10})
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        _, split = split_off(ds, 2, seed=0, stratify_by="label")
    assert len(split) == 2 and "cannot stratify" in caplog.text


def test_fraction_rounds_up_without_float_noise():
    ds = _table({"a": 15, "b": 15})
    assert len(split_off(ds, 0.1, seed=0)[1]) == 3
    assert len(split_off(ds, 0.11, seed=0)[1]) == 4


@pytest.mark.parametrize("size", [0, 100, 0.0, 1.0, 1.5, -3, True, "0.1"])
def test_split_rejects_bad_sizes(size):
    with pytest.raises(ValueError):
        split_off(_table({"a": 50, "b": 50}), size, seed=0)


def test_split_unknown_column():
    with pytest.raises(ValueError, match="no such column"):
        split_off(_table({"a": 5, "b": 5}), 2, seed=0, stratify_by="labels")


def test_subset_sizes_and_identity():
    ds = _table({"a": 80, "b": 20})
    assert stratified_subset(ds, 100, seed=0, stratify_by="label") is ds
    assert stratified_subset(ds, 500, seed=0) is ds
    for n in (1, 2, 7, 33, 99):
        sub = stratified_subset(ds, n, seed=1, stratify_by="label")
        assert len(sub) == n
        assert len(set(sub["_row"][:])) == n
    assert len(stratified_subset(ds, 17, seed=1)) == 17


def test_subset_keeps_proportions_and_rare_classes():
    ds = _table({"a": 80, "b": 20})
    assert _counts(stratified_subset(ds, 10, seed=0, stratify_by="label")) == {"a": 8, "b": 2}
    rare = _table({"a": 990, "b": 9, "c": 1})
    sub = stratified_subset(rare, 10, seed=0, stratify_by="label")
    assert _counts(sub) == {"a": 8, "b": 1, "c": 1}


def test_subset_is_deterministic_per_seed():
    ds = _table({"a": 60, "b": 30, "c": 10})
    first = stratified_subset(ds, 20, seed=7, stratify_by="label")["_row"][:]
    assert first == stratified_subset(ds, 20, seed=7, stratify_by="label")["_row"][:]
    assert first != stratified_subset(ds, 20, seed=8, stratify_by="label")["_row"][:]
    assert first == sorted(first)


def test_subset_allocation_invariants():
    # Many class shapes: exact size, never more than a class has, one row per class when possible.
    shapes = [{"a": 1, "b": 1, "c": 98}, {"a": 3, "b": 3, "c": 3, "d": 3}, {str(i): i + 1 for i in range(12)}]
    for shape in shapes:
        ds = _table(shape)
        for n in range(1, len(ds)):
            counts = _counts(stratified_subset(ds, n, seed=n, stratify_by="label"))
            assert sum(counts.values()) == n
            assert all(counts[k] <= shape[k] for k in counts)
            if n >= len(shape):
                assert set(counts) == set(shape)


def test_count_overlap():
    train = ["Great  film!", "bad", "So-so\n movie"]
    other = ["great film!", "BAD ", "so-so movie", "new", "bad"]
    assert count_overlap(train, other) == 4
    assert count_overlap([], other) == 0
    assert count_overlap(train, []) == 0


def _grouped(n_groups: int, per_group: int) -> datasets.Dataset:
    groups = [f"g{g:02d}" for _ in range(per_group) for g in range(n_groups)]   # groups interleaved
    return datasets.Dataset.from_dict({"title": groups, "_row": list(range(1, len(groups) + 1))})


def test_group_split_keeps_groups_whole_and_counts_groups():
    ds = _grouped(10, 3)
    rest, split = split_off_groups(ds, 3, seed=0, column="title")
    assert len(group_values(split, "title")) == 3 and len(split) == 9 and len(rest) == 21
    assert not set(group_values(split, "title")) & set(group_values(rest, "title"))
    assert split["_row"][:] == sorted(split["_row"][:])  # original order kept
    rest, split = split_off_groups(ds, 0.2, seed=0, column="title")
    assert len(group_values(split, "title")) == 2


def test_group_split_depends_on_seed_and_groups_not_row_order():
    ds = _grouped(10, 3)
    chosen = group_values(split_off_groups(ds, 4, seed=5, column="title")[1], "title")
    shuffled = ds.shuffle(seed=1)
    assert group_values(split_off_groups(shuffled, 4, seed=5, column="title")[1], "title") == chosen
    assert group_values(split_off_groups(ds, 4, seed=6, column="title")[1], "title") != chosen


def test_group_split_errors():
    ds = _grouped(3, 2)
    with pytest.raises(ValueError, match="no such column"):
        split_off_groups(ds, 1, seed=0, column="article")
    with pytest.raises(ValueError, match="no groups on one side"):
        split_off_groups(ds, 3, seed=0, column="title")
    with pytest.raises(ValueError, match="1 row"):
        split_off_groups(datasets.Dataset.from_dict({"title": ["a", None]}), 1, seed=0, column="title")


def test_a_training_set_too_small_to_split_says_which_split_and_what_to_do(tmp_path):
    from lmtune.config import load_config
    from lmtune.data import DataError
    from lmtune.registry import TASKS

    path = tmp_path / "one.csv"
    path.write_text("text,label\nonly row,pos\n", encoding="utf-8")
    cfg = load_config({"data": {"train": str(path)}})
    with pytest.raises(DataError) as info:
        TASKS["classification"](cfg.task, cfg.data).load_splits(seed=0)
    assert str(info.value) == ("data.test_size=0.1: cannot split a dataset of 1 row(s): give the test split its own "
                               "file (data.test) or set data.test_size=0")
