"""What the side-by-side benchmark scripts share: timing a system's subprocess and naming the device."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str]) -> float:
    """Run `command` in the checkout's root, echoed first, offline and importing lmtune from this checkout's src/;
    its wall seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    return round(time.perf_counter() - started, 1)


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
