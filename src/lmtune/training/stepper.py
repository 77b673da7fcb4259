"""The training step's runner: a window's forward-backward and the optimizer update, eager or as CUDA graphs."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from accelerate.utils import DistributedType

from lmtune.training import guard
from lmtune.training.batching import to_device
from lmtune.training.graphs import StepGraphs, optimizer_mode
from lmtune.training.losses import window_weights

# Inputs of a step that are not model arguments: the loss weight, the window share, served cached features.
INTERNAL = "lmtune:"
SCALE, SHARE, SERVED = INTERNAL + "scale", INTERNAL + "share", INTERNAL + "served:"
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)  # each process holds its own shards of the weights


class Stepper:
    """Runs a stage's steps: `backward` over each accumulation window, then `update`.

    With `replay`, each step function is recorded per input signature and replayed (see graphs); otherwise it
    runs eagerly. Either way the functions keep to the graphs' rules, so both paths compute the same: they read
    only their inputs and persistent state (parameters, kept gradients, the guard's and penalty's accumulators).
    """

    def __init__(self, model: Any, optimizer: Any, finite: guard.FiniteGuard, params: list[torch.Tensor],
                 accelerator: Any, *, replay: bool, cache: Any, dataset_key: str, max_grad_norm: float | None,
                 loss: Callable[[Any, dict], torch.Tensor] | None, penalty: Callable[[Any], torch.Tensor] | None,
                 count_targets: Callable[[dict], Any] | None, mean_targets: float | None) -> None:
        self.model, self.optimizer, self.guard, self.params, self.acc = model, optimizer, finite, params, accelerator
        self.cache, self.dataset_key, self.max_grad_norm = cache, dataset_key, max_grad_norm
        self.loss, self.penalty, self.count_targets, self.mean_targets = loss, penalty, count_targets, mean_targets
        self.penalty_sum = torch.zeros((), device=accelerator.device)
        # Made after a resume: the optimizer groups are set for this run's steps, whatever the checkpoint's said.
        optimizer_mode(optimizer, accelerator.device, recorded=replay and accelerator.device.type == "cuda")
        fns = {"backward": self._forward_backward, "update": self._update}
        self.graphs = StepGraphs(fns, accelerator.device) if replay else None
        self.grads_kept = False

    def backward(self, pending: list[tuple[dict, list[int]]], window: int) -> None:
        """Backward over one accumulation window; gradients are synchronised on its last batch only."""
        scales = window_weights([b for b, _ in pending], window, self.count_targets, self.mean_targets, self.acc)
        for i, (batch, rows) in enumerate(pending):
            inputs = {**batch, SCALE: scales[i], SHARE: 1 / window}
            if self.cache is not None:  # the mask on the host: the cache places rows without a device sync
                served = self.cache.serve(self.dataset_key, rows, batch["attention_mask"])
                inputs.update({SERVED + k: v for k, v in served.items()})
            if self.graphs is not None:  # one device: nothing to synchronise
                self.graphs("backward", inputs)
            else:
                with contextlib.nullcontext() if i == len(pending) - 1 else self.acc.no_sync(self.model):
                    self._forward_backward(to_device(inputs, self.acc.device))

    def update(self) -> None:
        """The optimizer step over the window's gradients (left out on the device where they are not finite)."""
        if self.graphs is None:
            self._update({})
            return
        if not self.grads_kept:
            self.grads_kept = True
            # A recorded update covers the parameters that hold a gradient when it is recorded; one that
            # gets its first gradient later (an expert no batch has routed to yet) must not be left out.
            for param in self.params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
        self.graphs("update", {})

    def penalty_mean(self, steps: int) -> float:
        """The penalty's mean per step over the last `steps` steps (its share of the training loss)."""
        value = self.acc.reduce(self.penalty_sum, "mean").item() / steps
        self.penalty_sum.zero_()
        return value

    def close(self, info: dict[str, Any]) -> None:
        """At the stage's end: the graphs' numbers into `info`, then the graphs, their memory pool and the kept
        gradients go before the next stage starts."""
        if self.graphs is None:
            return
        info["cuda_graphs"] = len(self.graphs.graphs)
        info["graph_recording_seconds"] = round(self.graphs.recording_seconds, 2)
        if self.graphs.failed:
            info["cuda_graphs_failed"] = self.graphs.failed
        self.graphs = None
        self.optimizer.zero_grad(set_to_none=True)

    def _forward_backward(self, inputs: dict[str, Any]) -> None:
        """One batch's forward and backward."""
        batch = {k: v for k, v in inputs.items() if not k.startswith(INTERNAL)}
        served = {k[len(SERVED):]: v for k, v in inputs.items() if k.startswith(SERVED)}
        with contextlib.nullcontext() if self.cache is None else self.cache.serving(served):
            outputs = self.model(**batch)
        loss = outputs.loss if self.loss is None else self.loss(outputs, batch)
        loss = loss * inputs[SCALE]
        if self.penalty is not None:  # e.g. L2-SP: added once per optimizer step, spread over its batches
            value = self.penalty(self.acc.unwrap_model(self.model)) * inputs[SHARE]
            self.penalty_sum += value.detach()
            loss = loss + value
        self.acc.backward(loss)
        self.guard.add_loss(loss)

    def _update(self, _inputs: dict[str, Any]) -> None:
        """Clipping and the optimizer step; the guard's flag is set in here, recorded with the step that reads it."""
        norm = None
        if self.acc.distributed_type in SHARDED:  # Accelerate gathers the norm over the shards
            norm = self.acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or math.inf)
        elif self.max_grad_norm:
            # Accelerate's clip walks every parameter and probes installed packages at each call, a
            # visible share of a small model's step; clipping the trainable list directly is the same.
            self.acc.unscale_gradients()
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        else:
            self.acc.unscale_gradients()
            norm = guard.total_norm(self.params)
        self.guard.flag(norm)  # a step whose gradients are not finite is skipped (on the device)
        if not self.guard.skip_on_host():
            self.optimizer.step()
        # Recorded steps keep the gradient tensors (zeroed in place): a graph adds into the ones it saw.
        self.optimizer.zero_grad(set_to_none=self.graphs is None)
