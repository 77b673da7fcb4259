"""Where a whole `lmtune train` goes: consecutive phases timed as laps, so they add up to the process's wall time
(`phase_seconds` in metrics.json, a line in the log)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

# Set by the command line as it starts: the process's own start, so imports and start-up count too. A library
# call (lmtune.train in a process that does other things) leaves it None and counts from its own call.
process_started: float | None = None


def process_start_time() -> float | None:
    """The wall-clock time this process was created (Linux /proc; psutil elsewhere), or None where unknown."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - no process table: start-up is simply not counted
        return None


class Phases:
    """Laps: `lap(name)` books the time since the previous lap (or since the start) under `name`."""

    def __init__(self) -> None:
        global process_started
        self.seconds: dict[str, float] = {}
        self.last = time.time()
        if process_started is not None:  # the first run of the process has it (not a second seed's)
            self.seconds["start-up"] = max(0.0, self.last - process_started)
            process_started = None

    def lap(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def split(self, name: str, parts: dict[str, float]) -> None:
        """Carve `parts` (seconds measured inside phase `name`, e.g. evaluations during training) out of it."""
        total = self.seconds.get(name, 0.0)
        for part, seconds in parts.items():
            seconds = min(max(seconds, 0.0), total)
            if seconds:
                self.seconds[part] = self.seconds.get(part, 0.0) + seconds
                total -= seconds
        self.seconds[name] = total

    def report(self) -> dict[str, Any]:
        return {name: round(seconds, 2) for name, seconds in self.seconds.items()} | {
            "total": round(sum(self.seconds.values()), 2)}

    def line(self) -> str:
        total = sum(self.seconds.values()) or 1.0
        return ", ".join(f"{name} {s:.1f} s ({s / total:.0%})" for name, s in self.seconds.items())


def record_phases(run_dir: Path, metrics: dict, phases: Phases) -> None:
    """metrics.json again with `phase_seconds`: where the whole run's time went (in `metrics` too)."""
    import json

    from lmtune.files import write_text
    from lmtune.training.logs import finite_json

    metrics["phase_seconds"] = phases.report()
    write_text(run_dir / "metrics.json", json.dumps(finite_json(metrics), indent=2, default=str, allow_nan=False))
