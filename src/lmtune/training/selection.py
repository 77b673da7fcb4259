"""What an evaluation during training decides: the score recorded, the best weights kept, early stopping."""

from __future__ import annotations

import logging
import math
import numbers
from typing import TYPE_CHECKING, Any

from lmtune.training import guard
from lmtune.training.checkpoint import LoopState, save_weights

if TYPE_CHECKING:
    from lmtune.config import TrainConfig
    from lmtune.training.logs import MetricsLog
    from lmtune.training.loop import Job

log = logging.getLogger("lmtune")


def evaluate(job: Job, model: Any, state: LoopState, cfg: TrainConfig, accelerator: Any, logs: MetricsLog,
             stage_name: str) -> bool:
    """Evaluate, track the best weights and early stopping; returns True when the stage should stop."""
    if job.evaluate is None:
        return False
    metrics = job.evaluate(accelerator.unwrap_model(model))
    logs.write(state.step, stage_name, {f"eval/{k}": v for k, v in metrics.items()})
    value = _score(job, metrics, state.step)
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


def _score(job: Job, metrics: dict[str, Any], step: int) -> float:
    """The selection metric's value; an error where the outputs were not finite or the task did not report it."""
    if not math.isfinite(metrics.get("loss", 0.0)):  # NaN outputs: no metric of this model means anything
        raise guard.diverged(job.run_dir, step, "the validation loss is not finite (the model's outputs are NaN/inf)")
    if job.metric not in metrics:  # preflight checked the task's metric_names; a task may still not report one
        from lmtune.config_read import unknown_metric
        from lmtune.errors import ConfigError

        raise ConfigError(unknown_metric("eval.metric", job.metric, sorted(metrics), "this task"))
    return float(metrics[job.metric])


def _improved(value: float, best: float | None, job: Job, min_delta: float) -> bool:
    if not math.isfinite(value):  # a NaN score is never the best
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best + min_delta if job.greater_is_better else value < best - min_delta
