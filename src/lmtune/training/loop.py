"""The one training loop: runs a method's stages on Accelerate, evaluating, checkpointing, resumable."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from lmtune.config import TrainConfig
from lmtune.training.batching import eval_batches, steps_per_epoch, train_batches
from lmtune.training.checkpoint import LoopState, load_weights, read_loop_state, save_checkpoint, save_weights
from lmtune.training.logs import MetricsLog

log = logging.getLogger("lmtune")


@dataclass
class Job:
    """Everything the loop needs from the rest of lmtune, and nothing task- or method-specific."""

    model: Any
    stages: list[Any]                                   # lmtune.methods.Stage
    train_set: Any                                      # rows with a "length" field (datasets.Dataset)
    collate: Callable[[list[dict]], dict]
    evaluate: Callable[[Any], dict[str, float]] | None  # model -> {"loss": .., "<metric>": ..}
    metric: str                                          # selection metric, a key of evaluate()
    greater_is_better: bool
    run_dir: Path
    callbacks: list[Callable[[LoopState], None]] = field(default_factory=list)


def build_optimizer(model: Any, stage: Any, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    params = dict(model.named_parameters())
    groups = []
    for group in stage.groups:
        lr = group.lr or cfg.lr
        wd = cfg.weight_decay if group.weight_decay is None else group.weight_decay
        # Decay matrices only: decaying biases and norm gains hurts and is not what AdamW papers do.
        decay = [params[n] for n in group.names if params[n].ndim >= 2]
        no_decay = [params[n] for n in group.names if params[n].ndim < 2]
        groups += [{"params": decay, "lr": lr, "weight_decay": wd},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=fused)


def set_trainable(model: Any, names: set[str]) -> tuple[int, int]:
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        trainable += param.numel() if name in names else 0
        total += param.numel()
    return trainable, total


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def iterate_outputs(model: Any, dataset: Any, collate: Callable, batch_size: int,
                    accelerator: Any) -> Iterator[tuple[list[int], Any, dict]]:
    """Forward passes over `dataset` in length-sorted batches: yields (row indices, outputs, batch).

    With several processes each runs its share and every process receives all results (on the CPU),
    so metrics are computed over the whole set everywhere.
    """
    world = accelerator.num_processes
    batches = eval_batches(dataset["length"][:], batch_size, rank=accelerator.process_index, world_size=world)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        pin_memory=accelerator.device.type == "cuda")
    was_training = model.training
    model.eval()
    results = []
    with torch.inference_mode(), accelerator.autocast():
        for indices, batch in zip(batches, loader):
            out = model(**to_device(batch, accelerator.device))
            if world == 1:
                yield indices, out, batch
            else:
                results.append((indices, {k: v.float().cpu() for k, v in out.items()}, batch))
    model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        for indices, out, batch in gather_object(results):
            yield indices, SimpleNamespace(**out), batch


def _improved(value: float, best: float | None, job: Job, min_delta: float) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if job.greater_is_better else value < best - min_delta


def _evaluate(job: Job, model: Any, state: LoopState, cfg: TrainConfig, accelerator: Any, logs: MetricsLog,
              stage_name: str) -> bool:
    """Evaluate, track the best weights and early stopping; returns True when the stage should stop."""
    if job.evaluate is None:
        return False
    metrics = job.evaluate(accelerator.unwrap_model(model))
    logs.write(state.step, stage_name, {f"eval/{k}": v for k, v in metrics.items()})
    if job.metric not in metrics:
        raise KeyError(f"eval.metric {job.metric!r} is not among the evaluated metrics {sorted(metrics)}")
    value = float(metrics[job.metric])
    if _improved(value, state.best_metric, job, cfg.early_stopping_min_delta):
        state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
        if cfg.load_best and accelerator.is_main_process:
            trainable = {n for s in job.stages for n in s.trainable}
            save_weights(accelerator.unwrap_model(model), job.run_dir / "checkpoints" / "best.safetensors",
                         trainable)
    else:
        state.bad_evals += 1
    patience = cfg.early_stopping_patience
    if patience and state.bad_evals >= patience:
        log.info("early stopping %s at step %d: no improvement of %s in %d evaluations (best %.4f at step %s)",
                 stage_name, state.step, job.metric, patience, state.best_metric, state.best_step)
        return True
    return False


def _stage_length(stage: Any, cfg: TrainConfig, n_rows: int, world_size: int) -> tuple[int, int]:
    per_epoch = steps_per_epoch(n_rows, cfg.batch_size, cfg.grad_accum, world_size)
    epochs = stage.epochs or cfg.epochs
    total = stage.max_steps or cfg.max_steps or per_epoch * epochs
    return total, math.ceil(total / per_epoch)


def _train_stage(job: Job, index: int, state: LoopState, cfg: TrainConfig, accelerator: Any,
                 logs: MetricsLog, resume_from: Path | None) -> None:
    stage = job.stages[index]
    model = job.model
    trainable, total_params = set_trainable(model, stage.trainable)
    fused = accelerator.device.type == "cuda"
    optimizer = build_optimizer(model, stage, cfg, fused)
    total_steps, epochs = _stage_length(stage, cfg, len(job.train_set), accelerator.num_processes)
    scheduler = get_scheduler("constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
                              optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    # The scheduler is not prepared: Accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:
        accelerator.load_state(str(resume_from / "state"))
        scheduler.load_state_dict(state.scheduler)
    else:
        state.epoch = state.batch = state.stage_step = state.bad_evals = 0
        state.stage_done = False
    log.info("stage %s: %s of %s parameters train, %d steps", stage.name, f"{trainable:,}",
             f"{total_params:,}", total_steps)
    logs.write(state.step, stage.name, {"stage/trainable_params": trainable, "stage/total_params": total_params,
                                        "stage/steps": total_steps})
    bar = tqdm(total=total_steps, initial=state.stage_step, desc=stage.name, dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    started = time.perf_counter() - state.stage_seconds.get(stage.name, 0.0)
    model.train()
    running = torch.zeros((), device=accelerator.device)  # loss summed on device: no host sync per step
    since_log = 0
    stop = state.stage_done
    postfix: dict[str, str] = {}
    lengths = job.train_set["length"][:]
    while not stop and state.epoch < epochs:
        batches = train_batches(lengths, cfg.batch_size, seed=cfg.seed + 7919 * index,
                                epoch=state.epoch, group_by_length=cfg.group_by_length,
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
        if not batches:
            raise ValueError(f"no training batches: {len(job.train_set)} rows over "
                             f"{accelerator.num_processes} processes")
        # A private generator keeps DataLoader from drawing on the global RNG (resume must replay it).
        loader = DataLoader(job.train_set, batch_sampler=batches[state.batch:], collate_fn=job.collate,
                            num_workers=cfg.num_workers, pin_memory=fused, generator=torch.Generator())
        for batch in loader:
            # Gradients of one optimizer step come from a window of grad_accum batches (shorter at the
            # end of an epoch); dividing by the window size makes the step the mean over its batches.
            window_start = (state.batch // cfg.grad_accum) * cfg.grad_accum
            window_end = min(window_start + cfg.grad_accum, len(batches))
            rows = batches[state.batch]
            state.examples += len(rows)
            state.tokens += sum(lengths[i] for i in rows)
            state.batch += 1
            last_micro = state.batch == window_end
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                loss = model(**to_device(batch, accelerator.device)).loss / (window_end - window_start)
                accelerator.backward(loss)
            running += loss.detach()
            if not last_micro:
                continue
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.stage_step += 1
            since_log += 1
            bar.update(1)
            end_of_epoch = state.batch == len(batches)
            end_of_stage = state.stage_step >= total_steps
            if state.stage_step % cfg.log_every == 0 or end_of_stage:
                loss_value = accelerator.reduce(running, "mean").item() / since_log
                logs.write(state.step, stage.name, {"train/loss": loss_value, "lr": scheduler.get_last_lr()[0],
                                                    "epoch": state.epoch + state.batch / len(batches)})
                postfix["loss"] = f"{loss_value:.4f}"
                bar.set_postfix(postfix)
                running.zero_()
                since_log = 0
            if end_of_epoch:
                state.epoch, state.batch = state.epoch + 1, 0
            if end_of_stage or (cfg.eval_every and state.stage_step % cfg.eval_every == 0) \
                    or (cfg.eval_every is None and end_of_epoch):
                stop = _evaluate(job, model, state, cfg, accelerator, logs, stage.name) or end_of_stage
                if state.best_metric is not None:
                    postfix[f"best {job.metric}"] = f"{state.best_metric:.4f}"
                    bar.set_postfix(postfix)
                state.stage_done = stop
                state.scheduler = scheduler.state_dict()
                state.stage_seconds[stage.name] = time.perf_counter() - started
                if cfg.checkpoint:
                    save_checkpoint(accelerator, job.run_dir / "checkpoints" / "last", state)
            for callback in job.callbacks:
                callback(state)
            if stop or end_of_epoch:
                break
    bar.close()
    state.stage_seconds[stage.name] = time.perf_counter() - started
    job.model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    best = job.run_dir / "checkpoints" / "best.safetensors"
    accelerator.wait_for_everyone()
    if cfg.load_best and best.exists():
        # The next stage (and the final model) starts from the best weights seen so far.
        load_weights(job.model, best)


def fit(job: Job, cfg: TrainConfig, accelerator: Any, resume: bool = False) -> LoopState:
    """Train every stage of `job` in turn; with `resume`, continue from checkpoints/last."""
    last = job.run_dir / "checkpoints" / "last"
    state = read_loop_state(last) if resume else LoopState()
    logs = MetricsLog(job.run_dir, accelerator, truncate_after=state.step if resume else None)
    try:
        for index in range(state.stage, len(job.stages)):
            resume_from = last if resume and index == state.stage else None
            if resume_from is None:
                state.stage = index
            _train_stage(job, index, state, cfg, accelerator, logs, resume_from)
            if index + 1 < len(job.stages):
                state.stage, state.stage_done = index + 1, False
    finally:
        logs.close()
    return state
