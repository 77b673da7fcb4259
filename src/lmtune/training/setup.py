"""A stage's set-up before its first step: trainable parameters, optimizer and guard, schedule, and the extras."""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from lmtune.training import averaging, feature_cache, guard
from lmtune.training.batching import steps_per_epoch
from lmtune.training.stepper import SHARDED

if TYPE_CHECKING:
    from lmtune.config import TrainConfig

log = logging.getLogger("lmtune")


def set_trainable(model: Any, names: set[str]) -> tuple[int, int]:
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        trainable += param.numel() if name in names else 0
        total += param.numel()
    return trainable, total


def build_optimizer(model: Any, stage: Any, cfg: TrainConfig, fused: bool,
                    capturable: bool = False) -> torch.optim.Optimizer:
    params = dict(model.named_parameters())
    groups = []
    for group in stage.groups:
        lr = (group.lr or cfg.lr) * group.lr_scale
        wd = cfg.weight_decay if group.weight_decay is None else group.weight_decay
        # Decay matrices only: decaying biases and norm gains hurts and is not what AdamW papers do.
        decay = [params[n] for n in group.names if params[n].ndim >= 2]
        no_decay = [params[n] for n in group.names if params[n].ndim < 2]
        groups += [{"params": decay, "lr": lr, "weight_decay": wd, "lr_scale": group.lr_scale},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0, "lr_scale": group.lr_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=fused, capturable=capturable)


def optimizer(model: Any, stage: Any, cfg: TrainConfig, accelerator: Any,
              capturable: bool) -> tuple[torch.optim.Optimizer, guard.FiniteGuard]:
    """AdamW over the stage's groups, and the guard that has it skip steps whose gradients are not finite."""
    fused = guard.fused_adamw_supported(accelerator.device)
    adamw = build_optimizer(model, stage, cfg, fused=fused, capturable=capturable)
    mode = "scaler" if accelerator.mixed_precision == "fp16" else "device" if fused else "host"
    return adamw, guard.FiniteGuard(adamw, accelerator.device, mode)


def stage_length(stage: Any, cfg: TrainConfig, n_rows: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps, epochs) of the stage."""
    per_epoch = steps_per_epoch(n_rows, cfg.batch_size, cfg.grad_accum, world_size, fold_single=cfg.compile)
    epochs = stage.epochs or cfg.epochs
    total = stage.max_steps or cfg.max_steps or per_epoch * epochs
    return total, math.ceil(total / per_epoch)


def schedule(adamw: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """train.schedule's learning-rate factor per step after a linear warmup of train.warmup_ratio of the steps:
    transformers' linear, cosine and constant_with_warmup schedules, written here because importing theirs pulls in
    `transformers.trainer_utils` and with it peft (a third of a second of every run's start-up)."""
    return torch.optim.lr_scheduler.LambdaLR(adamw, functools.partial(
        lr_factor, kind=cfg.schedule, warmup=int(cfg.warmup_ratio * total_steps), total=total_steps))


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))  # cosine: half a wave down to 0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def average(params: list[torch.Tensor], cfg: TrainConfig, accelerator: Any) -> averaging.WeightAverage | None:
    """train.ema_decay's average of the trained weights, or None."""
    if not cfg.ema_decay:
        return None
    shard = accelerator.process_index if accelerator.distributed_type in SHARDED else None
    return averaging.WeightAverage(params, cfg.ema_decay, shard, writes=accelerator.is_main_process)


def feature_cache_for(stage: Any, job: Any, model: Any) -> feature_cache.FeatureCache | None:
    """The frozen trunk's cache, installed but still empty, where the stage allows one; else None (logged why)."""
    if not getattr(stage, "cache_features", False):
        return None
    from lmtune.models import find_layers

    mask = job.collate([job.train_set[0]]).get("attention_mask")
    if mask is None or mask.ndim != 2:  # packed causal-LM rows carry a block mask, not one row of flags
        cache = "the batches carry no per-token padding mask (packed rows)"
    else:
        cache = feature_cache.install(model, find_layers(model)[0], stage.trainable)
    if isinstance(cache, str):
        log.info("stage %s: features not cached: %s", stage.name, cache)
        return None
    return cache
