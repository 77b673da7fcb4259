"""CUDA graphs of the training step: each batch shape's kernels are recorded once and replayed.

A small model's eager step is bound by the host: hundreds of kernel launches, each costing more CPU time than
the GPU spends on it. A replayed graph launches them all at once. What a graph may do is narrow, and the loop
keeps to it: the step function reads only its inputs (copied into fixed buffers before each replay) and
persistent state (parameters, gradients that are zeroed rather than freed, optimizer state with the learning
rate in a tensor, accumulators), writes only persistent state, and returns nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any, Callable

import torch
from accelerate.utils import DistributedType

from lmtune.training.batching import to_device

log = logging.getLogger("lmtune")

Inputs = dict[str, Any]  # tensors (host or device), Python floats, or hashable constants


def unavailable(cfg: Any, accelerator: Any) -> str | None:
    """Why the training step cannot run as CUDA graphs here; None when it can."""
    if not cfg.cuda_graphs:
        return "train.cuda_graphs is off"
    if accelerator.device.type != "cuda":
        return "not on a CUDA device"
    if accelerator.num_processes > 1 or accelerator.distributed_type != DistributedType.NO:
        return f"{accelerator.distributed_type.value} training (single device only)"
    if accelerator.mixed_precision == "fp16":
        return "fp16 loss scaling checks for overflow on the host"
    return None


def optimizer_mode(optimizer: torch.optim.Optimizer, device: torch.device, recorded: bool) -> None:
    """Set each group for recorded steps or plain ones, whatever a resumed checkpoint's groups said.

    Recorded: the learning rate as a tensor on `device` (made after the scheduler, so its base rates stay
    floats), which the scheduler fills in place and a recorded AdamW step reads, and `capturable` AdamW.
    Plain: a float rate and a non-capturable step (a checkpoint of a recorded run, resumed on a CPU)."""
    for group in optimizer.param_groups:
        rate = float(group["lr"])
        group["lr"] = torch.tensor(rate, dtype=torch.float32, device=device) if recorded else rate
        if "capturable" in group:
            group["capturable"] = recorded


def signature(inputs: Inputs) -> tuple:
    """What a graph is specific to: names, shapes and dtypes of tensors, kinds of floats, values of the rest."""
    parts = []
    for name in sorted(inputs):
        value = inputs[name]
        if torch.is_tensor(value):
            parts.append((name, tuple(value.shape), value.dtype))
        elif isinstance(value, float):
            parts.append((name, float))
        else:
            parts.append((name, value))
    return tuple(parts)


class CudaBackend:
    """Records CUDA graphs; all of them share one memory pool and one capture stream."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.pool, self.stream = device, None, torch.cuda.Stream(device)

    def buffer(self, value: Any) -> torch.Tensor:
        if isinstance(value, float):
            return torch.zeros((), dtype=torch.float32, device=self.device)
        return torch.empty(value.shape, dtype=value.dtype, device=self.device)

    def capture(self, fn: Callable[[Inputs], None], static: Inputs) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        # Not torch.cuda.graph: it runs gc.collect() and empties the allocator's cache at every recording, a
        # second or more with a training set held as Python rows, paid again for every batch shape.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the static inputs are written
        with torch.cuda.stream(self.stream):
            # thread_local: the DataLoader's pinning thread may allocate while the main thread records.
            graph.capture_begin(*(() if self.pool is None else (self.pool,)), capture_error_mode="thread_local")
            try:
                fn(static)
            except BaseException:
                with contextlib.suppress(Exception):  # the recording is invalid: ending it fails too
                    graph.capture_end()
                _reset_rng_capture()
                raise  # the step's own error, the one worth reporting
            try:
                graph.capture_end()
            except BaseException:
                _reset_rng_capture()
                raise
        # Sharing is safe: no graph leaves a live tensor in the pool that another one would read.
        self.pool = self.pool or graph.pool()
        return graph.replay


def _reset_rng_capture() -> None:
    """After a failed recording CUDA's random number generator still counts itself as recording (torch ends that
    only when a recording ends cleanly), and the next eager dropout would fail: an empty recording resets it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the CUDA graph is empty"
        with contextlib.suppress(Exception):
            empty = torch.cuda.CUDAGraph()
            empty.capture_begin(capture_error_mode="thread_local")
            empty.capture_end()


class StepGraphs:
    """Runs named step functions, each input signature as its own replayed graph.

    The first call of a signature runs eagerly: lazy set-up (optimizer state, library handles, gradients)
    happens outside any recording. The second records and replays; later ones only replay. Past `limit`
    graphs, new signatures stay eager. A recording that fails (e.g. a host sync inside the step) ends recording
    for good, with a warning: graphs already recorded keep replaying, every other step runs eagerly, and eager
    calls compute the same thing, so training goes on unchanged.
    """

    def __init__(self, fns: dict[str, Callable[[Inputs], None]], device: torch.device, limit: int = 64,
                 backend: Any = None) -> None:
        self.fns, self.device, self.limit = fns, device, limit
        self.backend = backend or CudaBackend(device)
        self.graphs: dict[tuple, tuple[Callable[[], None], Inputs]] = {}
        self.seen: set[tuple] = set()
        self.failed: str | None = None
        self.recording_seconds = 0.0

    def __call__(self, name: str, inputs: Inputs) -> None:
        key = (name, signature(inputs))
        entry = self.graphs.get(key)
        if entry is None and key in self.seen and self.failed is None and len(self.graphs) < self.limit:
            entry = self._record(key, name, inputs)
        self.seen.add(key)
        if entry is None:
            self.fns[name](to_device(inputs, self.device))
            return
        replay, static = entry
        _fill(static, inputs)
        replay()

    def _record(self, key: tuple, name: str, inputs: Inputs) -> tuple[Callable[[], None], Inputs] | None:
        static = {k: self.backend.buffer(v) if torch.is_tensor(v) or isinstance(v, float) else v
                  for k, v in inputs.items()}
        _fill(static, inputs)
        started = time.perf_counter()
        try:
            replay = self.backend.capture(self.fns[name], static)
        except Exception as error:  # noqa: BLE001 - any failure means: run this step eagerly
            self.failed = f"{type(error).__name__}: {error}".splitlines()[0]
            log.warning("CUDA graphs: recording the %s step failed (%s); steps not recorded yet run eagerly",
                        name, self.failed)
            return None
        self.recording_seconds += time.perf_counter() - started
        self.graphs[key] = (replay, static)
        if len(self.graphs) == self.limit:
            log.info("CUDA graphs: %d recorded, the limit; other batch shapes run eagerly", self.limit)
        return replay, static


def _fill(static: Inputs, inputs: Inputs) -> None:
    for name, value in inputs.items():
        if torch.is_tensor(value):
            static[name].copy_(value, non_blocking=True)  # from pinned host memory or the device: no stall
        elif isinstance(value, float):
            static[name].fill_(value)
