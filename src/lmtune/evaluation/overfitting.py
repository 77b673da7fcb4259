"""Overfitting diagnosis from a run's metrics.jsonl: where validation peaked, what followed, in a sentence."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmtune.config import TrainConfig

log = logging.getLogger("lmtune")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def eval_history(records: list[dict], metric: str) -> list[dict[str, Any]]:
    """One row per evaluation: step, mean train loss since the previous evaluation (the loop logs one at every
    evaluation; None in older logs without), validation loss and metric, and the gap (validation loss - train
    loss). A step logged twice (after a resume) keeps its last line."""
    key = metric if metric.startswith("eval/") else f"eval/{metric}"
    by_step: dict[int, dict] = {}
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step.setdefault(record["step"], {}).update(record)
    rows, pending = [], []
    for step in sorted(by_step):
        record = by_step[step]
        if _number(record.get("train/loss")) is not None:
            pending.append(record["train/loss"])  # logged before the evaluation of the same step
        value = _number(record.get(key))
        if value is None:
            continue
        train = sum(pending) / len(pending) if pending else None
        val_loss = _number(record.get("eval/loss"))
        rows.append({"step": step, "train_loss": train, "validation_loss": val_loss, "validation_metric": value,
                     "gap": None if train is None or val_loss is None else val_loss - train})
        pending = []
    return rows


def diagnose(records: list[dict], metric: str, greater_is_better: bool, best_kept: bool = True,
             min_delta: float = 0.0) -> dict[str, Any]:
    """Judge whether a run overfit its training data, from the lines of its metrics.jsonl.

    The rule is deliberately conservative; a run is called overfit only when all of these hold:
      1. there were at least two evaluations and the validation metric peaked before the last one;
      2. the last evaluation is worse than the peak by more than the noise floor: 1 point (0.01) for
         metrics on a 0-1 scale, 1% of the peak's size for anything else (losses, percentages), and
         never less than `min_delta` (train.early_stopping_min_delta);
      3. the training loss kept falling after the peak (its mean over the last evaluation interval is
         more than 1% below the mean over the interval that ended at the peak).
    A drop without a falling training loss is instability, not overfitting. Drops of 0-1 metrics are
    reported in points (x100, `drop_unit: "points"`); other metrics in their own units (`"value"`).
    """
    name = metric.removeprefix("eval/")
    rows = eval_history(records, metric)
    out: dict[str, Any] = {"metric": name, "greater_is_better": greater_is_better, "evaluations": len(rows),
                           "overfit": False, "history": rows}
    if len(rows) < 2:
        out["message"] = (f"not enough evaluations to judge overfitting ({len(rows)}); evaluate more often "
                          "with train.eval_every")
        return out
    values = [r["validation_metric"] for r in rows]
    pick = max if greater_is_better else min
    peak = next(r for r in rows if r["validation_metric"] == pick(values))  # the first time it was reached
    last = rows[-1]
    unit_scale = all(0 <= v <= 1 for v in values) and "loss" not in name
    drop = (peak["validation_metric"] - last["validation_metric"]) * (1 if greater_is_better else -1)
    noise = max(0.01 if unit_scale else 0.01 * abs(peak["validation_metric"]), min_delta)
    train_at_peak, train_final = peak["train_loss"], last["train_loss"]
    falling = train_at_peak is not None and train_final is not None and train_final < 0.99 * train_at_peak
    out.update(peak_step=peak["step"], peak_value=peak["validation_metric"], final_step=last["step"],
               final_value=last["validation_metric"], drop=drop * (100 if unit_scale else 1),
               drop_unit="points" if unit_scale else "value", noise_floor=noise * (100 if unit_scale else 1),
               train_loss_at_peak=train_at_peak, train_loss_final=train_final,
               train_loss_falling_after_peak=falling,
               validation_loss_trend=_trend(peak["validation_loss"], last["validation_loss"]))
    out["overfit"] = peak is not last and drop > noise and falling
    out["message"] = _message(out, best_kept)
    return out


def _trend(before: float | None, after: float | None) -> str | None:
    if before is None or after is None:
        return None
    if abs(after - before) <= 0.01 * abs(before):
        return "flat"
    return "rising" if after > before else "falling"


def _message(d: dict[str, Any], best_kept: bool) -> str:
    name, peak_step = f"validation {d['metric']}", d["peak_step"]
    if peak_step == d["final_step"]:
        return f"no sign of overfitting: {name} was still improving at the end ({d['final_value']:.4g} at step " \
               f"{peak_step})"
    verb = "fell" if d["greater_is_better"] else "rose"
    amount = f"{d['drop']:.1f} points" if d["drop_unit"] == "points" else f"{d['drop']:.4g}"
    change = f"{name} peaked at step {peak_step} ({d['peak_value']:.4g}) and {verb} {amount} by step {d['final_step']}"
    if d["drop"] <= d["noise_floor"]:
        return f"no clear sign of overfitting: {change}, within noise"
    if d["train_loss_at_peak"] is None or d["train_loss_final"] is None:
        return f"{change}; no training loss was logged by then (train.log_every), so overfitting cannot be told " \
               "from instability"
    if not d["train_loss_falling_after_peak"]:
        return f"{change}, but training loss did not keep falling: unstable rather than overfit (a lower " \
               "learning rate may help)"
    kept = f"the best checkpoint (step {peak_step}) was kept" if best_kept else \
        f"the final weights are from step {d['final_step']} (train.load_best=false)"
    return f"{change} while training loss kept falling ({d['train_loss_at_peak']:.3g} -> " \
           f"{d['train_loss_final']:.3g}): the run overfit; {kept}."


def diagnose_run(run_dir: Path, cfg: TrainConfig, metric: str, task: Any) -> dict[str, Any]:
    from lmtune.training.logs import read_records

    diagnosis = diagnose(read_records(run_dir), metric, task.greater_is_better(metric), best_kept=cfg.load_best,
                         min_delta=cfg.early_stopping_min_delta)
    log.info("overfitting: %s", diagnosis["message"])
    return diagnosis
