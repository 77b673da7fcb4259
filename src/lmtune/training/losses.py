"""Loss weighting shared by the loop and the tasks' set-up: token-count weights and label-smoothed cross-entropy."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch


def window_scales(counts: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Per micro-batch weights of its mean loss so that the window's loss is sum(token losses) / all targets.

    Counted over every process: DDP averages gradients over processes, hence the factor num_processes."""
    total = accelerator.reduce(counts.sum(), "sum") if accelerator.num_processes > 1 else counts.sum()
    return counts * accelerator.num_processes / total.clamp(min=1)


def mean_targets_per_batch(rows: Any, collate: Callable, count_targets: Callable, batch_size: int,
                           chunk: int = 32) -> float:
    """The training set's target tokens per micro-batch of `batch_size` rows, on average (the fixed denominator of
    train.loss_normalization=dataset); counted through the task's own collate, `chunk` rows at a time."""
    total = 0
    for start in range(0, len(rows), chunk):
        part = [rows[i] for i in range(start, min(start + chunk, len(rows)))]
        total += int(count_targets(collate(part)))
    return max(total, 1) / math.ceil(len(rows) / batch_size)


def cross_entropy_loss(targets: list[tuple[str, str]], label_smoothing: float) -> Callable[[Any, dict], torch.Tensor]:
    """The training loss recomputed as label-smoothed cross-entropy over each (output logits, batch targets) pair,
    averaged over pairs (QA: start and end, as the models do); targets of -100 are ignored."""
    def loss(outputs: Any, batch: dict) -> torch.Tensor:
        terms = [torch.nn.functional.cross_entropy(getattr(outputs, logits).flatten(0, -2).float(),
                                                   batch[labels].flatten(), ignore_index=-100,
                                                   label_smoothing=label_smoothing)
                 for logits, labels in targets]
        return sum(terms) / len(terms)
    return loss
