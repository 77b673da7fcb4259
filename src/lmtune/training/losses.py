"""Loss weighting shared by the loop and the tasks' set-up: token-count weights and label-smoothed cross-entropy."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch

from lmtune.training.feature_cache import to_device_async

if TYPE_CHECKING:
    from lmtune.config import TrainConfig


def window_scales(counts: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Per micro-batch weights of its mean loss so that the window's loss is sum(token losses) / all targets.

    Counted over every process: DDP averages gradients over processes, hence the factor num_processes."""
    total = accelerator.reduce(counts.sum(), "sum") if accelerator.num_processes > 1 else counts.sum()
    return counts * accelerator.num_processes / total.clamp(min=1)


def window_weights(batches: list[dict], window: int, count_targets: Callable[[dict], Any] | None,
                   mean_targets: float | None, accelerator: Any) -> Any:
    """Each batch's weight of its mean loss in an accumulation window of `window` batches: 1 / window (the step is
    the mean over its batches), or with `count_targets` the mean over every target token of the window."""
    if count_targets is None:
        return [1 / window] * len(batches)
    counts = torch.stack([torch.as_tensor(count_targets(b)) for b in batches])
    counts = to_device_async(counts.float(), accelerator.device)
    # Sum of token losses over the window's own count, or over the count a window holds on average
    # (each process; DDP's mean over processes then matches the count of all of them).
    return counts / (mean_targets * window) if mean_targets is not None else window_scales(counts, accelerator)


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


def training_loss(cfg: TrainConfig, task: Any) -> Callable | None:
    """The model's own loss (or the task's, where it has one), or label-smoothed cross-entropy over the task's targets
    (`check_setup` made sure that the task has some)."""
    if cfg.class_weights:
        return task.weighted_loss(cfg.class_weights, cfg.label_smoothing)
    if not cfg.label_smoothing:
        return task.own_loss()
    return cross_entropy_loss(task.cross_entropy_targets, cfg.label_smoothing)
