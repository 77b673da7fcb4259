"""Checkpoints: resumable state (via Accelerate) and best weights, always written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file

from lmtune.errors import CheckpointError
from lmtune.files import replace_dir, replace_file, sync_tree, write_text

log = logging.getLogger("lmtune")


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
    skipped_steps: int = 0    # optimizer steps skipped: their gradients were not finite
    examples: int = 0         # training examples seen (for throughput)
    tokens: int = 0           # real (non-pad) training tokens seen
    scheduler: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: params, steps, time, memory
    world_size: int | None = None  # processes that wrote it (None: an older checkpoint, taken as the current count)
    train_rows: int | None = None  # training rows the run started on (None: an older checkpoint)
    train_fingerprint: str | None = None  # datasets' fingerprint of those rows (their source files' state included)


def recover_dir(final: Path, complete: Callable[[Path], bool] = lambda p: (p / "loop_state.json").is_file()) -> None:
    """Put a checkpoint folder back after a crash inside `replace_dir`: the new one if `final`.tmp was complete,
    else the old one moved aside; leftovers of finished swaps are removed. (Only for folders inside a run's own.)"""
    olds = sorted(final.parent.glob(f"{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    olds += [p for p in [final.with_name(final.name + ".old")] if p.is_dir()]  # an older lmtune's name
    tmp = final.with_name(final.name + ".tmp")
    if not final.exists():
        if tmp.is_dir() and complete(tmp):
            log.warning("%s: a checkpoint save was cut off between its two renames; the new checkpoint was "
                        "complete and is used", final)
            os.replace(tmp, final)
        elif olds:
            log.warning("%s: a checkpoint save was cut off; the checkpoint before it is used", final)
            os.replace(olds.pop(), final)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def has_checkpoint(run_dir: Path, mend: bool = True) -> bool:
    """Whether `run_dir` holds a checkpoint to resume from; with `mend` (only in a folder this process holds), a
    save cut off between its renames is mended first, else such a save counts as a checkpoint as it is."""
    last = Path(run_dir) / "checkpoints" / "last"
    if not last.parent.is_dir():
        return False
    if mend:
        recover_dir(last)
        return last.is_dir()
    return last.is_dir() or (last.with_name("last.tmp") / "loop_state.json").is_file() or \
        any(last.parent.glob("last.old*"))


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
        sync_tree(tmp)  # every part on disk before the loop state marks the folder complete (see recover_dir)
        write_text(tmp / "loop_state.json", json.dumps(asdict(state), indent=1))
        replace_dir(tmp, folder)
    accelerator.wait_for_everyone()


def save_trained_only(accelerator: Any, model: Any, names: set[str]) -> Any:
    """An adapter run's checkpoints hold the weights its stages train (`names`: the adapters, a new head's copy), not
    the frozen backbone, which a resumed run reads from the pretrained model again: an 8B LoRA run writes megabytes,
    not 16 GB, and QLoRA's 4-bit storage is never serialised. Returns the hook's handle (`.remove()`)."""
    pointers = {p.data_ptr() for n, p in model.named_parameters() if n in names}  # state-dict tensors share them

    def keep_trained(models: list[Any], weights: list[dict[str, Any]], _output_dir: str) -> None:
        for i, weight in enumerate(weights):  # replaced in place: Accelerate saves this list after its hooks
            weights[i] = {k: v for k, v in weight.items() if v.data_ptr() in pointers}

    return accelerator.register_save_state_pre_hook(keep_trained)


def load_checkpoint(accelerator: Any, folder: Path, trained_only: bool = False) -> None:
    """Load a checkpoint's model, optimizer and RNG states (Accelerate), every part or none: Accelerate skips a random
    state it cannot read without a word, and the resumed run would then differ from an uninterrupted one."""
    from accelerate.utils import load

    rng = folder / "state" / f"random_states_{accelerator.process_index}.pkl"
    if rng.exists() or accelerator.process_index == 0:
        try:
            states = load(rng)
            missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states)
            if missing:
                raise ValueError(f"it lacks {', '.join(sorted(missing))}")
        except Exception as err:  # noqa: BLE001 - whatever the reader says, the resume would not be exact
            raise CheckpointError(f"{rng} cannot be read ({type(err).__name__}: {_first_line(err)}): resuming "
                                  "would not repeat the uninterrupted run's random draws. The checkpoint is damaged; "
                                  "train again without --resume (or into another output.name)") from None
    try:
        # An adapter's checkpoint holds what trains: the frozen rest stays as loaded (see save_trained_only).
        accelerator.load_state(str(folder / "state"), **({"strict": False} if trained_only else {}))
    except Exception as err:  # noqa: BLE001 - a missing or damaged part: say which checkpoint
        raise CheckpointError(f"checkpoint {folder} cannot be loaded ({type(err).__name__}: {_first_line(err)}); "
                              "it is damaged, or what the method trains changed since it was written (another "
                              "config or lmtune version): train again without --resume") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else "no message"


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
    replace_file(path, lambda tmp: save_file(tensors, str(tmp)))


def load_weights(model: Any, path: Path) -> None:
    tensors = load_file(str(path))
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"{path} holds weights this model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(tensors, strict=False)
