"""Numbers that are not finite: optimizer steps skipped on the device, counted without a host sync, and a run that
keeps diverging stopped with a clear error."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from lmtune.errors import DivergedError

log = logging.getLogger("lmtune")


def fused_adamw_supported(device: torch.device) -> bool:
    """Fused AdamW skips its update on the device when told a step's gradients were not finite."""
    return device.type in ("cuda", "cpu", "mps", "xpu")


class FiniteGuard:
    """Flags each optimizer step whose gradient norm is not finite and makes the optimizer skip it, all on the
    device (graph-safe: persistent tensors changed in place); the counts are read at logging steps only.

    The loss of a step counts towards the logged training loss only where the step was taken."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, mode: str) -> None:
        """`mode`: "device" (fused AdamW skips), "scaler" (fp16: the loss scaler skips such steps itself) or "host"
        (the loop asks `skip_on_host`, a sync per step: only where AdamW cannot be fused)."""
        zeros = lambda: torch.zeros((), dtype=torch.float32, device=device)  # noqa: E731
        self.skip, self.skipped, self.in_row, self.taken, self.window, self.running = (zeros() for _ in range(6))
        self.mode = mode
        if mode == "device":
            # Fused AdamW reads `found_inf` (as GradScaler sets it) and leaves weights, moments and step count
            # alone where it is 1.
            optimizer.found_inf = self.skip

    def add_loss(self, loss: torch.Tensor) -> None:
        """One batch's (scaled) loss of the current accumulation window."""
        self.window += loss.detach().float()

    def flag(self, norm: torch.Tensor | None) -> None:
        """After backward and clipping, before the optimizer step: mark the step for skipping where `norm` (the
        total gradient norm) is not finite."""
        if not torch.is_tensor(norm):  # DeepSpeed clips inside its own step (its reported norm is an earlier step's)
            self.skip.zero_()
        else:
            self.skip.copy_(~torch.isfinite(norm.detach().float()))
        self.running += torch.where(self.skip.bool(), 0.0, self.window)
        self.taken += 1 - self.skip
        self.skipped += self.skip
        self.in_row.mul_(self.skip).add_(self.skip)  # skipped steps in a row: +1, or back to 0 after a taken one
        self.window.zero_()

    def skip_on_host(self) -> bool:
        """Whether to leave out the optimizer step (only where the optimizer cannot skip on the device)."""
        return self.mode == "host" and bool(self.skip.item())

    def read(self, accelerator: Any) -> tuple[float | None, int, int]:
        """(mean training loss of the steps taken since the last read or None, steps skipped since then, skipped in
        a row now); one transfer from the device."""
        running = accelerator.reduce(self.running, "mean")
        loss_sum, taken, skipped, in_row = torch.stack([running, self.taken, self.skipped, self.in_row]).tolist()
        self.running.zero_()
        self.taken.zero_()
        self.skipped.zero_()
        loss = loss_sum / taken if taken and math.isfinite(loss_sum) else None
        return loss, int(skipped), int(in_row)


def total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' total 2-norm (NaN or inf where one of them is), without clipping them."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def weights_finite(params: list[torch.Tensor], accelerator: Any) -> bool:
    """Whether every weight is finite, on every process (one sync: for evaluations, not for steps). Integer storage
    (QLoRA's 4-bit weights) holds no infinities and is skipped."""
    params = [p for p in params if p.is_floating_point()]
    if params:
        norms = torch.stack(torch._foreach_norm([p.detach() for p in params]))
        bad = (~torch.isfinite(norms)).any().float()
    else:
        bad = torch.zeros((), device=accelerator.device)
    return accelerator.reduce(bad, "sum").item() == 0


def diverged(run_dir: Path, step: int, why: str) -> DivergedError:
    """The error that stops a diverged run, saying what is kept and what to change."""
    from lmtune.training.checkpoint import read_loop_state

    last = run_dir / "checkpoints" / "last"
    kept = (f"the last checkpoint ({last}, step {read_loop_state(last).step}) holds finite weights and is kept"
            if (last / "loop_state.json").is_file() else "no checkpoint had been written before it")
    return DivergedError(f"training diverged at step {step}: {why}; {kept}. Nothing was saved as the run's model. "
                         "Lower train.lr or set train.max_grad_norm (clipping), then train again")
