"""Batch order: covers every row once, groups lengths, replays exactly, shards evenly."""

from __future__ import annotations

import random

import pytest

from lmtune.training.batching import eval_batches, steps_per_epoch, train_batches


def lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 500) for _ in range(n)]


def padded_tokens(batches: list[list[int]], lens: list[int]) -> int:
    return sum(len(b) * max(lens[i] for i in b) for b in batches)


def test_every_row_once_and_deterministic() -> None:
    lens = lengths()
    a = train_batches(lens, 32, seed=1, epoch=0, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(len(lens)))
    assert a == train_batches(lens, 32, seed=1, epoch=0, group_by_length=True)
    assert a != train_batches(lens, 32, seed=1, epoch=1, group_by_length=True)


def test_grouping_cuts_padding_and_longest_batch_first() -> None:
    lens = lengths()
    grouped = train_batches(lens, 32, seed=1, epoch=0, group_by_length=True)
    plain = train_batches(lens, 32, seed=1, epoch=0, group_by_length=False)
    assert padded_tokens(grouped, lens) < 0.7 * padded_tokens(plain, lens)
    assert max(lens[i] for i in grouped[0]) == max(lens)


def test_does_not_touch_global_rng() -> None:
    import torch

    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    train_batches(lengths(), 32, seed=1, epoch=0, group_by_length=True)
    assert torch.equal(torch.rand(1), expected)


def test_shards_are_disjoint_and_equal_sized() -> None:
    lens = lengths(1001)
    shards = [train_batches(lens, 16, seed=0, epoch=0, group_by_length=True, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))


def test_eval_batches_sorted_and_complete() -> None:
    lens = lengths(100)
    batches = eval_batches(lens, 7)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(100))
    assert [lens[i] for i in flat] == sorted(lens, reverse=True)


def test_eval_batches_fill_shorter_rows_up_to_the_longest_batch_tokens() -> None:
    lens = [100] * 10 + [50] * 40 + [10] * 500 + [1] * 3
    batches = eval_batches(lens, 8)
    sizes = [len(b) for b in batches]
    assert sizes[0] == 8 and all(s >= 8 for s in sizes[:-1])
    # No batch holds more tokens than the first (8 rows of 100): 50-token rows come 16 at a time, 10-token ones 80.
    assert all(max(lens[i] for i in b) * len(b) <= 800 for b in batches)
    assert 16 in sizes and 80 in sizes
    assert sorted(i for b in batches for i in b) == list(range(len(lens)))
    shards = [eval_batches(lens, 8, rank=r, world_size=2) for r in range(2)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(len(lens)))
    assert eval_batches([], 8) == []
    # Sized by padded tokens, as the collate pads (here to multiples of 64): the first batch is 8 x 128 padded tokens, and
    # 10-token rows take 64 each, so 16 to a batch (not the 102 their real length would allow).
    padded = eval_batches([100] * 8 + [10] * 100, 8, width=lambda longest: -(-longest // 64) * 64)
    assert [len(b) for b in padded] == [8] + [16] * 6 + [4]
    # At most 16 x batch_size rows, however short (bounds the per-row host work of a batch).
    assert max(len(b) for b in eval_batches([100] * 8 + [1] * 1000, 8)) == 128


def test_steps_per_epoch_counts_partial_windows() -> None:
    assert steps_per_epoch(100, 8, 1) == 13
    assert steps_per_epoch(100, 8, 4) == 4
    assert steps_per_epoch(100, 8, 1, world_size=2) == 6


def test_small_training_sets_are_served_from_python_rows(monkeypatch) -> None:
    import datasets

    from lmtune.training import batching

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]], "labels": [0, 1, 0]})
    lengths = [3, 1, 2]
    rows = batching.in_memory(ds, lengths)
    assert isinstance(rows, list) and rows == [ds[i] for i in range(3)]
    assert rows[2] == {"input_ids": [5, 6], "labels": 0}
    monkeypatch.setattr(batching, "IN_MEMORY_TOKENS", 5)  # 6 tokens: too many, the dataset itself serves
    assert batching.in_memory(ds, lengths) is ds


@pytest.mark.parametrize("grouped", [False, True])
def test_a_single_row_last_batch_is_folded_for_compiled_runs(grouped: bool) -> None:
    """A compiled model recompiles for a batch of one row; with fold_single it joins the batch before it, and
    steps_per_epoch counts the same batches."""
    lens = lengths(33)
    plain = train_batches(lens, 8, seed=1, epoch=0, group_by_length=grouped)
    folded = train_batches(lens, 8, seed=1, epoch=0, group_by_length=grouped, fold_single=True)
    assert sorted(map(len, plain)) == [1, 8, 8, 8, 8] and sorted(map(len, folded)) == [8, 8, 8, 9]
    assert sorted(i for b in folded for i in b) == list(range(33))
    assert steps_per_epoch(33, 8, 1) == 5 and steps_per_epoch(33, 8, 1, fold_single=True) == len(folded) == 4
    assert steps_per_epoch(34, 8, 1, fold_single=True) == 5 and steps_per_epoch(1, 8, 1, fold_single=True) == 1
    # Batches of one row throughout: nothing to fold (a 2-row batch would be the odd shape out).
    ones = train_batches(lens[:5], 1, seed=1, epoch=0, group_by_length=grouped, fold_single=True)
    assert [len(b) for b in ones] == [1] * 5 and steps_per_epoch(5, 1, 1, fold_single=True) == 5
    for world in (2, 3):  # every process still gets the same number of batches, as steps_per_epoch says
        shards = [train_batches(lens, 4, seed=1, epoch=0, group_by_length=grouped, rank=r, world_size=world,
                                fold_single=True) for r in range(world)]
        assert {len(s) for s in shards} == {steps_per_epoch(33, 4, 1, world_size=world, fold_single=True)}
