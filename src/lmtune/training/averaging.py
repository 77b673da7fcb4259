"""train.ema_decay: an exponential moving average of a stage's trained weights, evaluated and kept in their place."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file


class WeightAverage:
    """Averages `params` after every optimizer step of a stage.

    After step s the average moves towards the weights by 1 - min(decay, s / (s + 1)): a plain mean of the
    stage's weights so far until s reaches decay / (1 - decay), an exponential average with that decay from then on,
    so early evaluations are not dominated by the stage's starting weights. The factor depends on s alone: a
    resumed stage continues with the same factors. Updates and swaps copy in place: recorded CUDA graphs and
    compiled blocks keep seeing the same tensors.
    """

    def __init__(self, params: list[torch.Tensor], decay: float, shard: int | None = None, writes: bool = True) -> None:
        """`shard`: this process's index where each process holds its own shards of the weights (FSDP, DeepSpeed),
        each then saving its own file; otherwise one file, written where `writes`, read by every process (a run
        may resume on another number of processes)."""
        self.params, self.decay = params, decay
        self.file = "weight_average.safetensors" if shard is None else f"weight_average-{shard}.safetensors"
        self.writes = writes or shard is not None
        with torch.no_grad():
            self.average = [p.detach().clone() for p in params]

    def update(self, stage_step: int) -> None:
        weight = 1 - min(self.decay, stage_step / (stage_step + 1))
        with torch.no_grad():
            torch._foreach_lerp_(self.average, [p.detach() for p in self.params], weight)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the parameters for the block (evaluation, best-weights save), the trained weights after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        """Exchange the parameters' values with the average's, one tensor at a time (one tensor of extra memory)."""
        with torch.no_grad():
            for p, a in zip(self.params, self.average):
                kept = p.detach().clone()
                p.detach().copy_(a)
                a.copy_(kept)

    def copy_in(self) -> None:
        """Leave the average in the parameters (the end of a stage that keeps its last weights)."""
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.params], self.average)

    def save(self, folder: Path) -> None:
        if not self.writes:
            return
        save_file({str(i): a.detach().contiguous().cpu() for i, a in enumerate(self.average)}, str(folder / self.file))

    def load(self, folder: Path) -> None:
        if not (folder / self.file).exists():
            raise RuntimeError(f"{folder} holds no {self.file}: it was written without train.ema_decay, or (sharded "
                               "training) by another number of processes")
        tensors = load_file(str(folder / self.file))
        if len(tensors) != len(self.average):
            raise RuntimeError(f"{folder / self.file} holds {len(tensors)} averaged tensors, this stage trains "
                               f"{len(self.average)}: the checkpoint was written with other settings")
        with torch.no_grad():
            for i, a in enumerate(self.average):
                a.copy_(tensors[str(i)])
