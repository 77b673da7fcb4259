"""Run logs: one JSON line per log/eval step in metrics.jsonl, mirrored to the run's trackers."""

from __future__ import annotations

import json
import math
import numbers
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only metrics.jsonl (+ the trackers: TensorBoard, MLflow, W&B) written by the main process only."""

    def __init__(self, run_dir: Path, accelerator: Any, truncate_after: int | None = None, trackers: Any = None) -> None:
        self.enabled = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers
        if not self.enabled:
            return
        if truncate_after is not None and self.path.exists():
            # Lines logged after the checkpoint we resume from will be logged again.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= truncate_after]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, stage: str, values: dict[str, Any]) -> None:
        """Log `values` at `step`; a value that is None or not a finite number is left out (never NaN in a log)."""
        if not self.enabled:
            return
        values = {k: v for k, v in values.items() if v is not None and not _not_finite(v)}
        record = {"step": step, "stage": stage, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(finite_json(record), default=_plain, allow_nan=False) + "\n")
        self._file.flush()
        if self.trackers is not None:
            self.trackers.log(step, values)

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def _not_finite(value: Any) -> bool:
    """A float (numpy's too) or a one-number tensor that is NaN or infinite."""
    if isinstance(value, (bool, int)) or not isinstance(value, numbers.Real) and getattr(value, "ndim", None) != 0:
        return False
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def finite_json(value: Any) -> Any:
    """`value` with every float that is not finite (NaN, inf) replaced by None: what JSON can hold."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(finite_json(v) for v in value)
    return None if _not_finite(value) else value


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def read_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def logged_lr(scheduler: Any, optimizer: Any) -> float:
    """The learning rate a run logs: the scheduled rate before layer-wise decay scales it (the first group with a
    non-zero scale; groups from a checkpoint written before scales were kept count as unscaled)."""
    rates = [float(r) / g.get("lr_scale", 1.0) for r, g in zip(scheduler.get_last_lr(), optimizer.param_groups)
             if g.get("lr_scale", 1.0)]
    return rates[0] if rates else 0.0
