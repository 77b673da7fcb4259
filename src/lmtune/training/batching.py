"""Batch order: length-grouped, seeded, resumable and sharded across processes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lmtune.training.losses import mean_targets_per_batch


def train_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool,
                  rank: int = 0, world_size: int = 1, fold_single: bool = False,
                  weights: Sequence[float] | None = None) -> list[list[int]]:
    """The batches (lists of row indices) this process trains on in `epoch`.

    The order depends only on (seed, epoch), never on global RNG state, so a resumed run can rebuild the
    exact order and skip what it already saw. With grouping, indices are shuffled, cut into megabatches of
    50 batches, sorted by length inside each megabatch (little padding), and the batches shuffled again
    so lengths still vary from step to step. With `weights`, an epoch is as many rows drawn with replacement
    at those odds (class-balanced sampling). The longest batch goes first so an out-of-memory error
    shows up at step 1, not hours in. With `fold_single`, a last batch of one row joins the one before it: a
    compiled model specialises on dimensions of size 1, so that batch alone would compile everything again.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist() if weights is None else \
        torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), len(lengths), replacement=True,
                          generator=g).tolist()  # as many rows, drawn with these odds (with `weights`)
    if group_by_length:
        mega = batch_size * 50
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if fold_single and batch_size > 1 and len(batches) > 1 and len(batches[-1]) == 1:
        single = batches.pop()
        batches[-1] = batches[-1] + single
    if group_by_length and len(batches) > 1:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        first = batches.pop(longest)
        batches = [first] + [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    # Every process needs the same number of steps; the last few batches are dropped, not padded with
    # repeats, so no example is counted twice.
    per_rank = len(batches) // world_size if world_size > 1 else len(batches)
    return batches[rank::world_size][:per_rank]


def eval_batches(lengths: Sequence[int], batch_size: int, *, width: Callable[[int], int] | None = None,
                 rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Evaluation batches sorted by length (least padding); callers restore the original order.

    The first batch holds `batch_size` of the longest rows; each later one at least `batch_size` rows (at most 16
    times that) and at most as many padded tokens as the first, `width(longest row)` being the width the collate
    pads a batch to. Short rows come many to a batch: fewer forward passes (each costs a small model more host
    time than GPU time), in no more memory than the longest batch takes."""
    width = width or (lambda longest: longest)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = batch_size * max(1, width(lengths[order[0]])) if order else 0
    batches, start = [], 0
    while start < len(order):
        size = min(16 * batch_size, max(batch_size, budget // max(1, width(lengths[order[start]]))))
        batches.append(order[start:start + size])
        start += size
    return batches[rank::world_size]


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (queued, not waited for); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int, world_size: int = 1,
                    fold_single: bool = False) -> int:
    batches = math.ceil(n_rows / batch_size)
    if fold_single and batch_size > 1 and batches > 1 and n_rows % batch_size == 1:  # see train_batches
        batches -= 1
    if world_size > 1:
        batches //= world_size
    return max(1, math.ceil(batches / grad_accum))


# Token budget under which a training set is held as Python rows (a few hundred MB at most).
IN_MEMORY_TOKENS = 2_000_000


def in_memory(dataset: Any, lengths: Sequence[int]) -> Any:
    """The training rows as a list of dicts when the set is small, else the dataset itself.

    A DataLoader fetching a batch from an Arrow-backed dataset spends about a millisecond on it, a visible
    share of a small model's step; from a list it is an index. Rows and their order are the same either way.
    """
    if sum(lengths) > IN_MEMORY_TOKENS or not hasattr(dataset, "to_list"):
        return dataset
    return dataset.to_list()


@dataclass
class TrainRows:
    """The training set as every stage reads it; worked out once per fit."""

    lengths: list[int]
    rows: Any  # a list of dicts for small sets (see in_memory), else the dataset
    mean_targets: float | None  # train.loss_normalization=dataset: target tokens per micro-batch, on average

    @classmethod
    def of(cls, train_set: Any, collate: Callable, count_targets: Callable | None, cfg: Any) -> "TrainRows":
        lengths = train_set["length"][:]
        # Worker processes would each copy a Python list (reference counts touch every row): Arrow for them.
        rows = in_memory(train_set, lengths) if cfg.num_workers == 0 else train_set
        mean = (mean_targets_per_batch(rows, collate, count_targets, cfg.batch_size)
                if count_targets is not None and cfg.loss_normalization == "dataset" else None)
        return cls(lengths, rows, mean)
