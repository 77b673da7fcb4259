"""Checkpoints: resumable state (via Accelerate) and best weights, always written atomically."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file


@dataclass
class LoopState:
    """Where the loop stands; saved with every checkpoint so a resumed run continues exactly."""

    stage: int = 0            # index of the stage being trained
    epoch: int = 0            # epoch within the stage
    batch: int = 0            # batches of this epoch already consumed
    step: int = 0             # optimizer steps, all stages together
    stage_step: int = 0       # optimizer steps in this stage
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0        # evaluations since the last improvement (early stopping)
    stage_done: bool = False
    evals: int = 0            # evaluations so far, all stages together
    last_eval: dict[str, Any] = field(default_factory=dict)  # the latest evaluation's metrics (for callbacks)
    examples: int = 0         # training examples seen (for throughput)
    tokens: int = 0           # real (non-pad) training tokens seen
    scheduler: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: params, steps, time, memory


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place; the old one is removed only after the swap."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_file(path: Path, write: Any) -> None:
    """Call `write(tmp_path)`, then move the finished file into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(accelerator: Any, folder: Path, state: LoopState, extra: Any = None) -> None:
    """Save model, optimizer, RNG states (Accelerate) and the loop state into `folder`, atomically; `extra(tmp)`,
    given, writes more files into the folder from every process."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    if extra is not None:
        extra(tmp)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text(tmp / "loop_state.json", json.dumps(asdict(state), indent=1))
        replace_dir(tmp, folder)
    accelerator.wait_for_everyone()


def read_loop_state(folder: Path) -> LoopState:
    return LoopState(**json.loads((folder / "loop_state.json").read_text(encoding="utf-8")))


def save_weights(model: Any, path: Path, names: set[str] | None = None) -> None:
    """Save (a subset of) a model's weights as safetensors, atomically."""
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        # Tied weights (shared storage) are stored once; loading one name restores both.
        if (names is None or k in names) and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            tensors[k] = v.detach().contiguous().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_weights(model: Any, path: Path) -> None:
    tensors = load_file(str(path))
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"{path} holds weights this model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(tensors, strict=False)
