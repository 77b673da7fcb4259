"""A session: a task with its tokenizer, model and accelerator, ready to encode inputs and run them (training or a
saved run); and the accelerator itself."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from lmtune.preflight import precision_problem

if TYPE_CHECKING:
    from lmtune.config import RunConfig


def make_accelerator(precision: str, device: str | None = None) -> Any:
    """The Accelerator for `precision` on the GPU where there is one (`device="cpu"`: on the CPU all the same)."""
    import torch
    from accelerate import Accelerator

    if device not in (None, "auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected auto, cpu or cuda")
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not cuda:
        raise ValueError("device cuda: no CUDA device is available here")
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if problem := precision_problem(precision):  # a saved run's precision on this machine (train checked it first)
        raise ValueError(problem)
    # cpu=True on a CPU-only machine lets torchrun/accelerate launch form a multi-process (gloo) group.
    return Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=not cuda)


def count_params(model: Any, names: set[str]) -> tuple[int, int]:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names), sum(p.numel() for p in params.values())


def pad_multiple(configured: int | None, max_length: int, device: str) -> int:
    """train.pad_to_multiple_of, or its default: 8 on a CPU; on a GPU coarse enough for at most 8 batch widths
    up to `max_length` (each width is an eager step, a CUDA-graph recording and new kernel plans)."""
    if configured:
        return configured
    return 8 if device != "cuda" else 8 * -(-max_length // 64)


class Session:
    """A task with its tokenizer and model, ready to encode inputs and run them (training or a saved run)."""

    def __init__(self, cfg: RunConfig, task: Any, tokenizer: Any, model: Any, accelerator: Any) -> None:
        from lmtune import models
        from lmtune.data.padding import batch_width  # (the data package brings datasets: not on `import lmtune`)

        self.cfg, self.task, self.tokenizer, self.model, self.accelerator = cfg, task, tokenizer, model, accelerator
        self.max_length = models.max_length(cfg.model, tokenizer, model.config)
        multiple = pad_multiple(cfg.train.pad_to_multiple_of, self.max_length, accelerator.device.type)
        widest = batch_width(self.max_length, 8)
        self.collate = task.collate(tokenizer, multiple, max_width=widest)
        self.width = functools.partial(batch_width, multiple=multiple, max_width=widest)  # as the collate pads
        self.batch_size = cfg.eval.batch_size or 2 * cfg.train.batch_size

    def encode(self, ds: Any) -> Any:
        return self.task.encode(ds, self.tokenizer, self.max_length)

    def outputs(self, features: Any, model: Any | None = None) -> Any:
        from lmtune.training.loop import iterate_outputs

        return iterate_outputs(model or self.model, features, self.collate, self.batch_size, self.accelerator,
                               width=self.width)

    def evaluate(self, features: Any, model: Any | None = None, examples: Any = None
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        """The task's metrics on `features` (with `examples`, the rows they were encoded from: its worst mistakes)."""
        if examples is None:
            return self.task.evaluate(self.outputs(features, model), features)
        return self.task.evaluate(self.outputs(features, model), features, examples)

    def generate(self, inputs: list[Any]) -> list[dict[str, Any]]:
        """Predictions of a generating task (causal LMs) for inputs from its `from_texts` (under the run's autocast, as
        its evaluations: the same numbers before and after training)."""
        with self.accelerator.autocast():
            return self.task.generate(self.model, self.tokenizer, inputs, self.accelerator.device)

    def score_generations(self, ds: Any) -> dict[str, Any]:
        return self.task.score_generations(ds, self.generate)
