"""What the side-by-side benchmark scripts share: timing a system's subprocess and naming the device."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child_env() -> dict[str, str]:
    """Offline, and importing lmtune from this checkout's src/."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}


def run(command: list[str]) -> float:
    """Run `command` in the checkout's root, echoed first (see `_child_env`); its wall seconds."""
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=_child_env())
    return round(time.perf_counter() - started, 1)


def run_logged(command: list[str], log: Path) -> tuple[float, str | None]:
    """`run` with the output going to `log` and a failure not raised: its wall seconds and why it failed (None if
    it did not, "out of memory" for a CUDA OOM, else the log's last lines)."""
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(command, cwd=ROOT, env=_child_env(), stdout=out, stderr=subprocess.STDOUT)
    wall = round(time.perf_counter() - started, 1)
    if done.returncode == 0:
        return wall, None
    text = log.read_text(encoding="utf-8", errors="replace")
    return wall, "out of memory" if "out of memory" in text.lower() else "\n".join(text.splitlines()[-15:])


def lmtune_runs(command: list[str], runs: int, metrics: Path) -> tuple[float, list[dict]]:
    """Run lmtune's `command` `runs` times one after the other (the first on whatever tokenization cache the caller
    left: a fresh LMTUNE_CACHE / HF_DATASETS_CACHE makes it a first run; the next ones reuse it): the last run's wall
    seconds, and per run its wall seconds, phase seconds (metrics.json) and non-training seconds."""
    done = []
    for _ in range(max(1, runs)):
        wall = run(command)
        phases = json.loads(metrics.read_text(encoding="utf-8")).get("phase_seconds", {})
        done.append({"wall_seconds": wall, "non_training_seconds": non_training(phases), "phase_seconds": phases})
    return done[-1]["wall_seconds"], done


def non_training(phases: dict[str, float]) -> float | None:
    """What a run spent outside its training steps, its evaluations and its final evaluation (issue 28's measure):
    start-up, config, reading and tokenizing, model load, checkpoints, saving, plots and reports."""
    if "total" not in phases:
        return None
    busy = sum(phases.get(k, 0.0) for k in ("training", "evaluation", "final evaluation"))
    return round(phases["total"] - busy, 2)


def describe_runs(runs: list[dict], baseline_wall: float) -> str:
    """One line per lmtune run: wall, non-training seconds and the whole-process ratio against the baseline."""
    return "\n".join(f"lmtune run {i}: whole {r['wall_seconds']:.1f} s, non-training {r['non_training_seconds']} s, "
                     f"whole-process ratio {baseline_wall / r['wall_seconds']:.2f}x" for i, r in enumerate(runs, 1))


def time_split(metrics: dict) -> dict[str, float]:
    """Where lmtune's train_seconds went (from its metrics.json): validation passes (best-checkpoint writes
    included), resumable checkpoints, CUDA graph recordings, and the training steps (the rest)."""
    stages = metrics.get("stages", {}).values()
    split = {name: round(sum(s.get(f"{name}_seconds", 0.0) for s in stages), 2)
             for name in ("eval", "checkpoint", "graph_recording")}
    split["steps"] = round(metrics["train_seconds"] - sum(split.values()), 2)
    return split


def describe(split: dict[str, float]) -> str:
    return ("lmtune's train s: steps {steps}, validation {eval}, checkpoints {checkpoint}, graph recording "
            "{graph_recording}").format(**split)


def device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
