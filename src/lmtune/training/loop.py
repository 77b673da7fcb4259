"""The one training loop: runs a method's stages on Accelerate, evaluating, checkpointing, resumable."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lmtune.errors import CheckpointError
from lmtune.models import is_adapter
from lmtune.training import compiling, graphs, guard, setup
from lmtune.training.batching import TrainRows, steps_per_epoch, train_batches
from lmtune.training.checkpoint import (LoopState, load_checkpoint, load_weights, read_loop_state, save_checkpoint,
                                        save_trained_only)
from lmtune.training.logs import MetricsLog, logged_lr
from lmtune.training.passes import ensure_cached, iterate_outputs
from lmtune.training.selection import evaluate
from lmtune.training.setup import build_optimizer, set_trainable
from lmtune.training.stepper import INTERNAL, SCALE, SERVED, SHARDED, SHARE, Stepper

if TYPE_CHECKING:
    from lmtune.config import TrainConfig

# With names other modules own that callers import from here.
__all__ = ["Job", "fit", "iterate_outputs", "ensure_cached", "build_optimizer", "set_trainable", "INTERNAL", "SCALE",
           "SHARE", "SERVED", "SHARDED"]

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
    trackers: Any = None  # where the metrics log is mirrored (training.trackers.Trackers: TensorBoard, MLflow, W&B)
    sample_weights: Any = None  # per training row: each epoch draws rows with these odds (data.sampler: balanced)

    @property
    def trained(self) -> set[str]:
        """The parameters some stage trains."""
        return {n for stage in self.stages for n in stage.trainable}


class _StageRun:
    """One stage from set-up to restored best weights; the loop body is `run`, read it top to bottom."""

    def __init__(self, job: Job, index: int, state: LoopState, cfg: TrainConfig, accelerator: Any,
                 logs: MetricsLog, resume_from: Path | None, train_rows: TrainRows) -> None:
        self.job, self.index, self.state, self.cfg, self.acc, self.logs = job, index, state, cfg, accelerator, logs
        self.stage = stage = job.stages[index]
        self.lengths, self.rows = train_rows.lengths, train_rows.rows
        if resume_from is not None:
            self._same_data()
        self.since_log, self.postfix = 0, {}  # steps since the last logged one; the progress bar's numbers
        # Optimizer and schedule; AdamW is capturable where its step is recorded as a CUDA graph.
        trainable, total = set_trainable(job.model, stage.trainable)
        no_graphs = graphs.unavailable(cfg, accelerator)
        optimizer, self.guard = setup.optimizer(job.model, stage, cfg, accelerator, capturable=no_graphs is None
                                                and accelerator.device.type == "cuda")
        self.total_steps, self.epochs = setup.stage_length(stage, cfg, len(job.train_set), accelerator.num_processes)
        self.scheduler = setup.schedule(optimizer, cfg, self.total_steps)
        # The scheduler is not prepared: Accelerate would step it once per process.
        self.model, self.optimizer = accelerator.prepare(job.model, optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Extras: the weight average, the frozen trunk's feature cache (after prepare: on its device), compilation.
        self.average = setup.average(self.params, cfg, accelerator)
        # The caching pass counts in the stage's time; a resumed stage goes on from its time so far.
        self.started = time.perf_counter() - state.stage_seconds.get(stage.name, 0.0)
        self.cache = self._feature_cache()
        self.compiled = (compiling.blocks(accelerator.unwrap_model(self.model)) if cfg.compile and self.cache is None
                         else [])
        if resume_from is not None:
            self._resume(resume_from)
        self.steps = Stepper(self.model, self.optimizer, self.guard, self.params, accelerator,
                             replay=no_graphs is None, cache=self.cache, dataset_key=job.train_set._fingerprint,
                             max_grad_norm=cfg.max_grad_norm, loss=job.loss, penalty=getattr(stage, "penalty", None),
                             count_targets=job.count_targets, mean_targets=train_rows.mean_targets)
        self._begin(trainable, total, no_graphs, fresh=resume_from is None)

    def _same_data(self) -> None:
        """A resumed run's training rows must be the ones its saved position counts in: refused where their number
        changed (the position would point at other rows, or past the epoch's end), a warning where only their
        content did (the same number of rows: it goes on at the saved position over the new rows)."""
        state, rows = self.state, len(self.job.train_set)
        if state.train_rows is not None and state.train_rows != rows:
            raise CheckpointError(f"--resume: the training data has {rows:,} rows now and had {state.train_rows:,} "
                                  "when the run started, so its saved data position means other rows: put the data "
                                  "the run started on back, or train again")
        fingerprint = getattr(self.job.train_set, "_fingerprint", None)
        if state.train_fingerprint not in (None, fingerprint):
            log.warning("--resume: the training data changed since the run started (the same number of rows): the "
                        "run goes on at its saved position over the rows as they are now")

    def _resume(self, folder: Path) -> None:
        """Weights, optimizer, schedule, average and RNG states as the checkpoint has them. After the extras' set-up:
        whatever random numbers it drew, the stage goes on from the checkpoint's."""
        load_checkpoint(self.acc, folder, trained_only=is_adapter(self.job.model))
        self.scheduler.load_state_dict(self.state.scheduler)
        if self.average is not None:
            self.average.load(folder)
        if self.state.world_size not in (None, self.acc.num_processes):
            self._regrid(self.state.world_size)
        self.state.world_size = self.acc.num_processes

    def _regrid(self, saved: int) -> None:
        """A checkpoint written by `saved` processes resumed by another number: the epoch's position becomes the
        same share of its global batches in this count's batches (rounded down to a window: a few batches may
        be seen again, none skipped; an epoch whose share is used up goes on at the next one), the stage's step
        and the schedule follow it. The run's step counter stays the count of steps taken (it never goes back)."""
        state, cfg, now = self.state, self.cfg, self.acc.num_processes
        consumed = state.batch * saved // now  # this count's batches of the epoch already seen, per process
        position = consumed - consumed % cfg.grad_accum
        per_epoch = steps_per_epoch(len(self.job.train_set), cfg.batch_size, cfg.grad_accum, now,
                                    fold_single=cfg.compile)
        epoch = state.epoch
        if position // cfg.grad_accum >= per_epoch:  # (each process's share of an epoch drops its remainder)
            epoch, position = epoch + 1, 0
        stage_step = min(self.total_steps, epoch * per_epoch + position // cfg.grad_accum)
        log.warning("stage %s: the checkpoint was written by %d process(es) and is resumed by %d: it goes on at "
                    "epoch %d, batch %d of this count (was epoch %d, batch %d), stage step %d of %d (was %d of that "
                    "count's); random draws cannot repeat the uninterrupted run's", self.stage.name, saved, now,
                    epoch + 1, position, state.epoch + 1, state.batch, stage_step, self.total_steps,
                    state.stage_step)
        state.epoch, state.batch, state.stage_step = epoch, position, stage_step
        with warnings.catch_warnings():  # the schedule at the new step: its learning rates set as a step sets them
            warnings.simplefilter("ignore")
            self.scheduler.last_epoch = stage_step - 1
            self.scheduler.step()

    def _feature_cache(self) -> Any:
        """Run the frozen trunk once over the training set when the stage allows it (see feature_cache)."""
        model = self.acc.unwrap_model(self.model)
        cache = setup.feature_cache_for(self.stage, self.job, model)
        if cache is not None:
            ensure_cached(cache, model, self.job.train_set, self.job.collate, 2 * self.cfg.batch_size, self.acc,
                          width=self.job.width)
        return cache

    def _begin(self, trainable: int, total: int, no_graphs: str | None, fresh: bool) -> None:
        """The stage's position (a fresh stage's at its start) and what it says about itself."""
        state, stage = self.state, self.stage
        if no_graphs is not None and self.cfg.cuda_graphs and self.acc.device.type == "cuda":
            log.info("stage %s: no CUDA graphs: %s", stage.name, no_graphs)
        if fresh:
            state.epoch = state.batch = state.stage_step = state.bad_evals = 0
            state.stage_done = False
            state.world_size = self.acc.num_processes
        state.train_rows = len(self.job.train_set)
        state.train_fingerprint = getattr(self.job.train_set, "_fingerprint", None)
        if self.acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        log.info("stage %s: %s of %s parameters train, %d steps", stage.name, f"{trainable:,}", f"{total:,}",
                 self.total_steps)
        state.stages.setdefault(stage.name, {}).update(trainable_params=trainable, total_params=total,
                                                       steps=self.total_steps, feature_cache=self.cache is not None)
        if fresh:  # (a resumed stage's line is in the log already)
            self.logs.write(state.step, stage.name, {"stage/trainable_params": trainable, "stage/total_params": total,
                                                     "stage/steps": self.total_steps})

    def run(self) -> None:
        bar = tqdm(total=self.total_steps, initial=self.state.stage_step, desc=self.stage.name, dynamic_ncols=True,
                   disable=not self.acc.is_local_main_process)
        try:  # a callback may stop the run by raising (a pruned search trial): the bar still closes
            self.model.train()
            if 0 < self.total_steps <= self.state.stage_step and not self.state.stage_done:
                self._evaluate_and_checkpoint()  # resumed at its last step (another process count): its evaluation
            stop = self.state.stage_done
            while not stop and self.state.epoch < self.epochs:
                stop = self._epoch(bar)
        finally:
            bar.close()
        self._finish()

    def _epoch(self, bar: Any) -> bool:
        """The rest of the current epoch, one optimizer step per accumulation window; True: the stage stops."""
        state, cfg = self.state, self.cfg
        batches = self._epoch_batches()
        # A private generator keeps DataLoader from drawing on the global RNG (resume must replay it).
        loader = DataLoader(self.rows, batch_sampler=batches[state.batch:], collate_fn=self.job.collate,
                            num_workers=cfg.num_workers, pin_memory=self.acc.device.type == "cuda",
                            generator=torch.Generator())
        pending: list[tuple[dict, list[int]]] = []  # the window's batches: weights need all of them
        for batch in loader:
            rows = batches[state.batch]
            # Gradients of one optimizer step come from a window of grad_accum batches (shorter at the
            # end of an epoch); dividing by the window size makes the step the mean over its batches, or
            # with job.count_targets the mean over every target token of the window (see window_weights).
            window_start = (state.batch // cfg.grad_accum) * cfg.grad_accum
            window = min(window_start + cfg.grad_accum, len(batches)) - window_start
            state.batch += 1
            state.examples += len(rows)
            state.tokens += sum(self.lengths[i] for i in rows)
            pending.append((batch, rows))
            if state.batch == window_start + window and self._step(pending, window, len(batches), bar):
                return True
        return False  # the epoch's last batch ends a window: its step is taken

    def _epoch_batches(self) -> list[list[int]]:
        """This epoch's batches of row indices: the same on every resume of it (seeded by stage and epoch)."""
        cfg, state = self.cfg, self.state
        batches = train_batches(self.lengths, cfg.batch_size, seed=cfg.seed + 7919 * self.index, epoch=state.epoch,
                                group_by_length=cfg.group_by_length, rank=self.acc.process_index,
                                world_size=self.acc.num_processes, fold_single=cfg.compile,
                                weights=self.job.sample_weights)
        if not batches:
            raise ValueError(f"no training batches: {len(self.job.train_set)} rows over "
                             f"{self.acc.num_processes} processes")
        if state.batch >= len(batches):  # a checkpoint's position the rebuilt epoch does not have
            raise RuntimeError(f"resumed at batch {state.batch} of an epoch of {len(batches)} batches: the "
                               "checkpoint was written with other batches (data or batch settings changed)")
        return batches

    def _step(self, pending: list[tuple[dict, list[int]]], window: int, epoch_batches: int, bar: Any) -> bool:
        """One optimizer step and what follows it; True: the stage stops."""
        state, cfg = self.state, self.cfg
        # Learn: backward over the window (its batches go before the update), then update and schedule.
        self.steps.backward(pending, window)
        pending.clear()
        self.steps.update()
        self.scheduler.step()
        state.step += 1
        state.stage_step += 1
        if self.average is not None:
            self.average.update(state.stage_step)
        self.since_log += 1
        bar.update(1)
        # Log: every log_every steps, and at each evaluation (which then has its training loss).
        end_of_epoch = state.batch == epoch_batches
        end_of_stage = state.stage_step >= self.total_steps
        evaluating = end_of_stage or (cfg.eval_every and state.stage_step % cfg.eval_every == 0) \
            or (cfg.eval_every is None and end_of_epoch)
        if state.stage_step % cfg.log_every == 0 or evaluating:
            self._log_training(state.epoch + state.batch / epoch_batches)
        if end_of_epoch:
            state.epoch, state.batch = state.epoch + 1, 0
        # Evaluate and checkpoint: the position saved is the next step's.
        stop = False
        if evaluating:
            stop = self._evaluate_and_checkpoint() or end_of_stage
            if state.best_metric is not None:
                self.postfix[f"best {self.job.metric}"] = f"{state.best_metric:.4f}"
        bar.set_postfix(self.postfix, refresh=False)
        # Callbacks last: they see the step's evaluation, and one that raises stops the run after its checkpoint.
        for callback in self.job.callbacks:
            callback(state)
        return stop

    def _log_training(self, epoch: float) -> None:
        loss = self._check_steps(self.since_log)
        values = {"train/loss": loss, "lr": logged_lr(self.scheduler, self.optimizer), "epoch": epoch}
        if self.steps.penalty is not None:  # its share of train/loss
            values["train/penalty"] = self.steps.penalty_mean(self.since_log)
        self.logs.write(self.state.step, self.stage.name, values)
        if loss is not None:
            self.postfix["loss"] = f"{loss:.4f}"
        self.since_log = 0

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
        if not guard.weights_finite(self.params, self.acc):  # never evaluated, selected or checkpointed
            raise guard.diverged(self.job.run_dir, state.step, "the weights hold values that are not finite (NaN/inf)")
        info, started = state.stages[self.stage.name], time.perf_counter()
        # Compiling for inference too would stall the run again; with train.ema_decay the average is evaluated.
        swap = self.average is not None and self.job.evaluate is not None
        with compiling.plain(self.compiled), self.average.swapped_in() if swap else contextlib.nullcontext():
            stop = evaluate(self.job, self.model, state, self.cfg, self.acc, self.logs, self.stage.name)
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
        """The stage's numbers, its speed devices undone, and the weights it hands on (its best, if kept)."""
        job, state, name = self.job, self.state, self.stage.name
        state.stage_seconds[name] = time.perf_counter() - self.started
        info = state.stages[name]
        info["seconds"] = round(state.stage_seconds[name], 2)
        if self.average is not None:  # the stage ends on its average (replaced below by the best, if kept)
            self.average.copy_in()
        self.steps.close(info)
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


def fit(job: Job, cfg: TrainConfig, accelerator: Any, resume: bool = False) -> LoopState:
    """Train every stage of `job` in turn; with `resume`, continue from checkpoints/last."""
    last = job.run_dir / "checkpoints" / "last"
    state = read_loop_state(last) if resume else LoopState()
    logs = MetricsLog(job.run_dir, accelerator, truncate_after=state.step if resume else None, trackers=job.trackers)
    train_rows = TrainRows.of(job.train_set, job.collate, job.count_targets, cfg)
    # The training rows (Python objects when held in memory) and the model live until the end: frozen, the
    # collector's full passes no longer walk them (seconds of stalls over a run with millions of token ids).
    gc.collect()
    gc.freeze()
    slim = save_trained_only(accelerator, job.model, job.trained) if is_adapter(job.model) else None
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
        if slim is not None:
            slim.remove()
    return state
