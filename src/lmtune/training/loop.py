"""The one training loop: runs a method's stages on Accelerate, evaluating, checkpointing, resumable."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from lmtune.config import TrainConfig
from lmtune.training.batching import TrainRows, eval_batches, steps_per_epoch, to_device, train_batches
from lmtune.training.checkpoint import (LoopState, load_checkpoint, load_weights, read_loop_state, save_checkpoint,
                                        save_weights)
from lmtune.training import averaging, compiling, feature_cache, graphs, guard
from lmtune.training.graphs import StepGraphs, optimizer_mode
from lmtune.training.losses import window_scales
from lmtune.training.logs import MetricsLog, logged_lr

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
    width: Callable[[int], int]  # longest row -> the width `collate` pads its batch to (sizes evaluation batches)
    # Called with the loop state after every optimizer step; `state.evals`/`state.last_eval` tell a callback
    # that an evaluation just happened (a pruner reads them). An exception raised here stops the run.
    callbacks: list[Callable[[LoopState], None]] = field(default_factory=list)
    loss: Callable[[Any, dict], torch.Tensor] | None = None  # (outputs, batch) -> training loss; None: outputs.loss
    # batch -> number of targets its (mean) loss averages over; given, a step's loss is the mean over every
    # target of its accumulation window (token-level LM losses) instead of the mean of its batches' means.
    count_targets: Callable[[dict], torch.Tensor] | None = None


# Inputs of a step that are not model arguments: the loss weight, the window share, served cached features.
INTERNAL = "lmtune:"
SCALE, SHARE, SERVED = INTERNAL + "scale", INTERNAL + "share", INTERNAL + "served:"
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)  # each process holds its own shards of the weights


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


def set_trainable(model: Any, names: set[str]) -> tuple[int, int]:
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        trainable += param.numel() if name in names else 0
        total += param.numel()
    return trainable, total


def iterate_outputs(model: Any, dataset: Any, collate: Callable, batch_size: int, accelerator: Any, *,
                    width: Callable[[int], int]) -> Iterator[tuple[list[int], Any, dict]]:
    """Forward passes over `dataset` in length-sorted batches: yields (row indices, outputs, batch).

    With several processes each runs its share and every process receives all results (on the CPU),
    so metrics are computed over the whole set everywhere.
    """
    world = accelerator.num_processes
    batches = eval_batches(dataset["length"][:], batch_size, width=width, rank=accelerator.process_index,
                           world_size=world)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        pin_memory=accelerator.device.type == "cuda")
    cache = feature_cache.find(model)
    if cache is not None:  # a stage with a frozen, cached trunk is evaluating: serve this set from memory too
        ensure_cached(cache, model, dataset, collate, batch_size, accelerator, width=width)
    was_training = model.training
    model.eval()
    results = []
    bar = _terminal_bar(sum(map(len, batches)), "evaluating", accelerator)
    try:  # a consumer that stops early or fails still gets the model back as it was
        with bar, torch.inference_mode(), accelerator.autocast():
            for indices, batch in zip(batches, loader):
                on_device = to_device(batch, accelerator.device)
                if cache is not None:
                    cache.current = cache.serve(dataset._fingerprint, indices, batch["attention_mask"])
                out = model(**on_device)
                bar.update(len(indices))
                if world == 1:
                    yield indices, out, batch
                else:
                    results.append((indices, {k: v.float().cpu() for k, v in out.items()}, batch))
    finally:
        if cache is not None:
            cache.current = None
        model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        for indices, out, batch in gather_object(results):
            yield indices, SimpleNamespace(**out), batch


def _improved(value: float, best: float | None, job: Job, min_delta: float) -> bool:
    if not math.isfinite(value):  # a NaN score is never the best
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best + min_delta if job.greater_is_better else value < best - min_delta


def _evaluate(job: Job, model: Any, state: LoopState, cfg: TrainConfig, accelerator: Any, logs: MetricsLog,
              stage_name: str) -> bool:
    """Evaluate, track the best weights and early stopping; returns True when the stage should stop."""
    if job.evaluate is None:
        return False
    metrics = job.evaluate(accelerator.unwrap_model(model))
    logs.write(state.step, stage_name, {f"eval/{k}": v for k, v in metrics.items()})
    if not math.isfinite(metrics.get("loss", 0.0)):  # NaN outputs: no metric of this model means anything
        raise guard.diverged(job.run_dir, state.step, "the validation loss is not finite (the model's outputs are "
                             "NaN/inf)")
    if job.metric not in metrics:  # preflight checked the task's metric_names; a task may still not report one
        from lmtune.config import ConfigError, unknown_metric

        raise ConfigError(unknown_metric("eval.metric", job.metric, sorted(metrics), "this task"))
    value = float(metrics[job.metric])
    state.evals += 1
    state.last_eval = {k: float(v) for k, v in metrics.items()  # JSON-safe
                       if isinstance(v, numbers.Real) and math.isfinite(v)}
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
    per_epoch = steps_per_epoch(n_rows, cfg.batch_size, cfg.grad_accum, world_size, fold_single=cfg.compile)
    epochs = stage.epochs or cfg.epochs
    total = stage.max_steps or cfg.max_steps or per_epoch * epochs
    return total, math.ceil(total / per_epoch)


class _StageRun:
    """One stage from set-up to restored best weights; the loop body is `run`, read it top to bottom."""

    def __init__(self, job: Job, index: int, state: LoopState, cfg: TrainConfig, accelerator: Any,
                 logs: MetricsLog, resume_from: Path | None, train_rows: TrainRows) -> None:
        self.job, self.index, self.state, self.cfg, self.acc, self.logs = job, index, state, cfg, accelerator, logs
        self.stage = stage = job.stages[index]
        trainable, total = set_trainable(job.model, stage.trainable)
        no_graphs = graphs.unavailable(cfg, accelerator)
        fused = guard.fused_adamw_supported(accelerator.device)
        optimizer = build_optimizer(job.model, stage, cfg, fused=fused,
                                    capturable=no_graphs is None and accelerator.device.type == "cuda")
        self.guard = guard.FiniteGuard(optimizer, accelerator.device, "scaler" if accelerator.mixed_precision == "fp16"
                                       else "device" if fused else "host")
        self.total_steps, self.epochs = _stage_length(stage, cfg, len(job.train_set), accelerator.num_processes)
        self.scheduler = get_scheduler("constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
                                       optimizer, num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        # The scheduler is not prepared: Accelerate would step it once per process.
        self.model, self.optimizer = accelerator.prepare(job.model, optimizer)
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        shard = accelerator.process_index if accelerator.distributed_type in SHARDED else None
        self.average = (averaging.WeightAverage(self.trainable_params, cfg.ema_decay, shard,
                                                writes=accelerator.is_main_process) if cfg.ema_decay else None)
        started = time.perf_counter()  # the caching pass is part of the stage's time
        self.cache = self._feature_cache()  # after prepare: the model is on its device
        self.compiled = compiling.blocks(accelerator.unwrap_model(self.model)) if cfg.compile and self.cache is None else []
        if resume_from is not None:
            load_checkpoint(accelerator, resume_from)
            self.scheduler.load_state_dict(state.scheduler)
            if self.average is not None:
                self.average.load(resume_from)
        self.graphs, self.grads_kept = None, False
        optimizer_mode(self.optimizer, accelerator.device, recorded=no_graphs is None and
                       accelerator.device.type == "cuda")
        if no_graphs is None:
            self.graphs = StepGraphs({"backward": self._forward_backward, "update": self._update},
                                     accelerator.device)
        elif cfg.cuda_graphs and accelerator.device.type == "cuda":
            log.info("stage %s: no CUDA graphs: %s", stage.name, no_graphs)
        if resume_from is None:
            state.epoch = state.batch = state.stage_step = state.bad_evals = 0
            state.stage_done = False
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        log.info("stage %s: %s of %s parameters train, %d steps", stage.name, f"{trainable:,}", f"{total:,}",
                 self.total_steps)
        state.stages.setdefault(stage.name, {}).update(trainable_params=trainable, total_params=total,
                                                       steps=self.total_steps, feature_cache=self.cache is not None)
        logs.write(state.step, stage.name, {"stage/trainable_params": trainable, "stage/total_params": total,
                                            "stage/steps": self.total_steps})
        self.lengths, self.rows, self.mean_targets = train_rows.lengths, train_rows.rows, train_rows.mean_targets
        self.penalty_sum = torch.zeros((), device=accelerator.device)
        self.started = started - state.stage_seconds.get(stage.name, 0.0)

    def _feature_cache(self) -> Any:
        """Run the frozen trunk once over the training set when the stage allows it (see feature_cache)."""
        if not getattr(self.stage, "cache_features", False):
            return None
        from lmtune.models import find_layers

        model = self.acc.unwrap_model(self.model)
        mask = self.job.collate([self.job.train_set[0]]).get("attention_mask")
        if mask is None or mask.ndim != 2:  # packed causal-LM rows carry a block mask, not one row of flags
            cache = "the batches carry no per-token padding mask (packed rows)"
        else:
            cache = feature_cache.install(model, find_layers(model)[0], self.stage.trainable)
        if isinstance(cache, str):
            log.info("stage %s: features not cached: %s", self.stage.name, cache)
            return None
        ensure_cached(cache, model, self.job.train_set, self.job.collate, 2 * self.cfg.batch_size,
                      self.acc, width=self.job.width)
        return cache

    def run(self) -> None:
        bar = tqdm(total=self.total_steps, initial=self.state.stage_step, desc=self.stage.name, dynamic_ncols=True,
                   disable=not self.acc.is_local_main_process)
        try:  # a callback may stop the run by raising (a pruned search trial): the bar still closes
            self._train(bar)
        finally:
            bar.close()
        self._finish()

    def _train(self, bar: Any) -> None:
        state, cfg, stage = self.state, self.cfg, self.stage
        self.model.train()
        since_log, stop, postfix = 0, state.stage_done, {}
        pending: list[tuple[dict, list[int]]] = []  # the window's batches: weights need all of them
        while not stop and state.epoch < self.epochs:
            batches = train_batches(self.lengths, cfg.batch_size, seed=cfg.seed + 7919 * self.index,
                                    epoch=state.epoch, group_by_length=cfg.group_by_length,
                                    rank=self.acc.process_index, world_size=self.acc.num_processes,
                                    fold_single=cfg.compile)
            if not batches:
                raise ValueError(f"no training batches: {len(self.job.train_set)} rows over "
                                 f"{self.acc.num_processes} processes")
            if state.batch >= len(batches):  # a checkpoint's position the rebuilt epoch does not have
                raise RuntimeError(f"resumed at batch {state.batch} of an epoch of {len(batches)} batches: the "
                                   "checkpoint was written with other batches (data or batch settings changed)")
            # A private generator keeps DataLoader from drawing on the global RNG (resume must replay it).
            loader = DataLoader(self.rows, batch_sampler=batches[state.batch:], collate_fn=self.job.collate,
                                num_workers=cfg.num_workers, pin_memory=self.acc.device.type == "cuda",
                                generator=torch.Generator())
            for batch in loader:
                rows = batches[state.batch]
                # Gradients of one optimizer step come from a window of grad_accum batches (shorter at the
                # end of an epoch); dividing by the window size makes the step the mean over its batches, or
                # with job.count_targets the mean over every target token of the window (see window_scales).
                window_start = (state.batch // cfg.grad_accum) * cfg.grad_accum
                window = min(window_start + cfg.grad_accum, len(batches)) - window_start
                state.batch += 1
                state.examples += len(rows)
                state.tokens += sum(self.lengths[i] for i in rows)
                pending.append((batch, rows))
                if state.batch < window_start + window:
                    continue
                self._backward_window(pending, window)
                pending.clear()
                self._optimizer_step()
                since_log += 1
                bar.update(1)
                end_of_epoch = state.batch == len(batches)
                end_of_stage = state.stage_step >= self.total_steps
                evaluating = end_of_stage or (cfg.eval_every and state.stage_step % cfg.eval_every == 0) \
                    or (cfg.eval_every is None and end_of_epoch)
                if state.stage_step % cfg.log_every == 0 or evaluating:  # each evaluation has its training loss
                    loss_value = self._check_steps(since_log)
                    values = {"train/loss": loss_value, "lr": logged_lr(self.scheduler, self.optimizer),
                              "epoch": state.epoch + state.batch / len(batches)}
                    if getattr(stage, "penalty", None) is not None:  # its share of train/loss
                        values["train/penalty"] = self.acc.reduce(self.penalty_sum, "mean").item() / since_log
                        self.penalty_sum.zero_()
                    self.logs.write(state.step, stage.name, values)
                    if loss_value is not None:
                        postfix["loss"] = f"{loss_value:.4f}"
                    since_log = 0
                if end_of_epoch:
                    state.epoch, state.batch = state.epoch + 1, 0
                if evaluating:
                    stop = self._evaluate_and_checkpoint() or end_of_stage
                    if state.best_metric is not None:
                        postfix[f"best {self.job.metric}"] = f"{state.best_metric:.4f}"
                bar.set_postfix(postfix, refresh=False)
                for callback in self.job.callbacks:
                    callback(state)
                if stop or end_of_epoch:
                    break

    def _backward_window(self, pending: list[tuple[dict, list[int]]], window: int) -> None:
        """Backward over one accumulation window; gradients are synchronised on its last batch only."""
        scales: Any = [1 / window] * len(pending)
        if self.job.count_targets is not None:
            counts = torch.stack([torch.as_tensor(self.job.count_targets(b)) for b, _ in pending])
            counts = feature_cache.to_device_async(counts.float(), self.acc.device)
            # Sum of token losses over the window's own count, or over the count a window holds on average
            # (each process; DDP's mean over processes then matches the count of all of them).
            scales = (counts / (self.mean_targets * window) if self.mean_targets is not None
                      else window_scales(counts, self.acc))
        for i, (batch, rows) in enumerate(pending):
            inputs = {**batch, SCALE: scales[i], SHARE: 1 / window}
            if self.cache is not None:  # the mask on the host: the cache places rows without a device sync
                served = self.cache.serve(self.job.train_set._fingerprint, rows, batch["attention_mask"])
                inputs.update({SERVED + k: v for k, v in served.items()})
            if self.graphs is not None:
                self.graphs("backward", inputs)
            else:
                with contextlib.nullcontext() if i == len(pending) - 1 else self.acc.no_sync(self.model):
                    self._forward_backward(to_device(inputs, self.acc.device))

    def _forward_backward(self, inputs: dict[str, Any]) -> None:
        """One batch's forward and backward; reads only `inputs` and persistent state (see graphs)."""
        batch = {k: v for k, v in inputs.items() if not k.startswith(INTERNAL)}
        if self.cache is not None:
            self.cache.current = {k[len(SERVED):]: v for k, v in inputs.items() if k.startswith(SERVED)}
        outputs = self.model(**batch)
        loss = outputs.loss if self.job.loss is None else self.job.loss(outputs, batch)
        loss = loss * inputs[SCALE]
        penalty = getattr(self.stage, "penalty", None)
        if penalty is not None:  # e.g. L2-SP: added once per optimizer step, spread over its batches
            value = penalty(self.acc.unwrap_model(self.model)) * inputs[SHARE]
            self.penalty_sum += value.detach()
            loss = loss + value
        self.acc.backward(loss)
        self.guard.add_loss(loss)

    def _optimizer_step(self) -> None:
        if self.graphs is not None:
            if not self.grads_kept:
                self.grads_kept = True
                # A recorded update covers the parameters that hold a gradient when it is recorded; one that
                # gets its first gradient later (an expert no batch has routed to yet) must not be left out.
                for param in self.trainable_params:
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
            self.graphs("update", {})
        else:
            self._update({})
        self.scheduler.step()
        self.state.step += 1
        self.state.stage_step += 1
        if self.average is not None:
            self.average.update(self.state.stage_step)

    def _update(self, _inputs: dict[str, Any]) -> None:
        norm = None
        if self.acc.distributed_type in SHARDED:  # Accelerate gathers the norm over the shards
            norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or math.inf)
        elif self.cfg.max_grad_norm:
            # Accelerate's clip walks every parameter and probes installed packages at each call, a
            # visible share of a small model's step; clipping the trainable list directly is the same.
            self.acc.unscale_gradients()
            norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, self.cfg.max_grad_norm, foreach=True)
        else:
            self.acc.unscale_gradients()
            norm = guard.total_norm(self.trainable_params)
        self.guard.flag(norm)  # a step whose gradients are not finite is skipped (on the device)
        if not self.guard.skip_on_host():
            self.optimizer.step()
        # Recorded steps keep the gradient tensors (zeroed in place): a graph adds into the ones it saw.
        self.optimizer.zero_grad(set_to_none=self.graphs is None)

    def _check_steps(self, steps: int) -> float | None:
        """At a logging step: the mean training loss of the steps taken since the last one (None if none was); warns
        of skipped steps and stops a run whose last `train.max_skipped_steps` steps were all skipped."""
        loss, skipped, in_row = self.guard.read(self.acc)
        if skipped:
            self.state.skipped_steps += skipped
            log.warning("%s: %d of the last %d optimizer steps were skipped: their gradients were not finite "
                        "(NaN/inf)", self.stage.name, skipped, steps)
        if in_row >= self.cfg.max_skipped_steps:
            raise guard.diverged(self.job.run_dir, self.state.step, f"the last {in_row} optimizer steps had gradients "
                                 f"that are not finite (NaN/inf) and were skipped (train.max_skipped_steps="
                                 f"{self.cfg.max_skipped_steps})")
        return loss

    def _evaluate_and_checkpoint(self) -> bool:
        state = self.state
        if not guard.weights_finite(self.trainable_params, self.acc):  # never evaluated, selected or checkpointed
            raise guard.diverged(self.job.run_dir, state.step, "the weights hold values that are not finite (NaN/inf)")
        if self.cache is not None:
            self.cache.current = None
        info, started = state.stages[self.stage.name], time.perf_counter()
        # Compiling for inference too would stall the run again; with train.ema_decay the average is evaluated.
        swap = self.average is not None and self.job.evaluate is not None
        with compiling.plain(self.compiled), self.average.swapped_in() if swap else contextlib.nullcontext():
            stop = _evaluate(self.job, self.model, state, self.cfg, self.acc, self.logs, self.stage.name)
        state.stage_done = stop or state.stage_step >= self.total_steps  # resuming here trains no more
        info["eval_seconds"] = round(info.get("eval_seconds", 0.0) + time.perf_counter() - started, 2)
        state.scheduler = {k: [float(x) for x in v] if isinstance(v, list) and any(map(torch.is_tensor, v)) else v
                           for k, v in self.scheduler.state_dict().items()}  # JSON: device learning rates as floats
        state.stage_seconds[self.stage.name] = time.perf_counter() - self.started
        if self.cfg.checkpoint:
            started = time.perf_counter()
            save_checkpoint(self.acc, self.job.run_dir / "checkpoints" / "last", state,
                            extra=self.average.save if self.average else None)
            info["checkpoint_seconds"] = round(info.get("checkpoint_seconds", 0.0) + time.perf_counter() - started, 2)
        return stop

    def _finish(self) -> None:
        job, state, name = self.job, self.state, self.stage.name
        state.stage_seconds[name] = time.perf_counter() - self.started
        info = state.stages[name]
        info["seconds"] = round(state.stage_seconds[name], 2)
        if self.average is not None:  # the stage ends on its average (replaced below by the best, if kept)
            self.average.copy_in()
        if self.graphs is not None:
            info["cuda_graphs"] = len(self.graphs.graphs)
            info["graph_recording_seconds"] = round(self.graphs.recording_seconds, 2)
            if self.graphs.failed:
                info["cuda_graphs_failed"] = self.graphs.failed
            self.graphs = None  # the recorded graphs and their memory pool go before the next stage starts
            self.optimizer.zero_grad(set_to_none=True)  # the kept gradients too
        if self.acc.device.type == "cuda":
            info["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if self.cache is not None:
            self.cache.remove()
        job.model = self.acc.unwrap_model(self.model)
        compiling.release(self.compiled, job.model)  # train.compile covers training: evaluation, generation plain
        self.acc.free_memory()
        best = job.run_dir / "checkpoints" / "best.safetensors"
        self.acc.wait_for_everyone()
        if self.cfg.load_best and best.exists():
            # The next stage (and the final model) starts from the best weights seen so far.
            if state.best_step is not None and state.best_step <= state.step - state.stage_step and self.index:
                log.warning("stage %s never beat the %s of an earlier stage (%.4f at step %d): the weights of "
                            "that step are kept", name, job.metric, state.best_metric, state.best_step)
            load_weights(job.model, best)


def _terminal_bar(rows: int, desc: str, accelerator: Any) -> Any:
    """A progress bar of rows, on a terminal only (disable=None): a long pass on a CPU shows its progress, logs stay
    free of bar lines, other processes show none."""
    return tqdm(total=rows, desc=desc, unit="row", leave=False, dynamic_ncols=True,
                disable=None if accelerator.is_local_main_process else True)


def ensure_cached(cache: Any, model: Any, dataset: Any, collate: Callable, batch_size: int, accelerator: Any, *,
                  width: Callable[[int], int]) -> None:
    """Fill the feature cache for `dataset` (all rows, frozen trunk in eval mode) unless already there."""
    key = dataset._fingerprint
    if key in cache.tables:
        return
    lengths = dataset["length"][:]
    batches = eval_batches(lengths, batch_size, width=width)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, generator=torch.Generator())
    was_training = model.training
    model.eval()
    cache.current = None
    bar = _terminal_bar(len(dataset), "caching features", accelerator)

    def counted() -> Iterator[tuple[list[int], dict]]:
        for rows, batch in zip(batches, loader):
            yield rows, batch
            bar.update(len(rows))

    with bar, accelerator.autocast():
        cache.build(key, counted(), lambda b: model(**to_device(b, accelerator.device)), len(dataset),
                    sum(lengths), accelerator.device)
    model.train(was_training)


def fit(job: Job, cfg: TrainConfig, accelerator: Any, resume: bool = False) -> LoopState:
    """Train every stage of `job` in turn; with `resume`, continue from checkpoints/last."""
    last = job.run_dir / "checkpoints" / "last"
    state = read_loop_state(last) if resume else LoopState()
    logs = MetricsLog(job.run_dir, accelerator, truncate_after=state.step if resume else None)
    train_rows = TrainRows.of(job.train_set, job.collate, job.count_targets, cfg)
    # The training rows (Python objects when held in memory) and the model live until the end: frozen, the
    # collector's full passes no longer walk them (seconds of stalls over a run with millions of token ids).
    gc.collect()
    gc.freeze()
    try:
        for index in range(first := state.stage, len(job.stages)):  # resumed: only `first` from the checkpoint
            resume_from = last if resume and index == first else None
            state.stage = index  # (already so where this stage resumes)
            _StageRun(job, index, state, cfg, accelerator, logs, resume_from, train_rows).run()
            if index + 1 < len(job.stages):
                state.stage, state.stage_done = index + 1, False
    finally:
        gc.unfreeze()
        logs.close()
    return state
