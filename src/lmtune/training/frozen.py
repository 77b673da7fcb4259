"""Frozen weights held in the autocast precision: an adapter run's backbone at half the memory, results unchanged.

An adapter (LoRA and relatives) never updates the backbone's linear layers, and under autocast every matrix product
casts their fp32 weights to bf16/fp16 anyway: holding them in that precision gives the same products from half the
memory (a Llama-3-8B's LoRA run: 32 GB of fp32 weights become 16 GB). Only plain `nn.Linear` layers whose parameters
are all frozen for every stage change (not under a DoRA adapter, which normalises the base weight itself); embeddings,
norms and a head tied to the embeddings stay in fp32 (they are not matrix products under autocast, so halving them
would change the numbers). Outside autocast (a generation, a probe) such a layer casts
its input to the weights' precision and its output back, so callers see the dtypes they passed.
"""

from __future__ import annotations

from typing import Any

import torch


class HalfFrozenLinear(torch.nn.Linear):
    """A frozen `nn.Linear` holding its weights in half precision (the class of the converted instances)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def hold_frozen_linear(model: Any, dtype: torch.dtype, trained: set[str] | frozenset[str] = frozenset()) -> int:
    """Convert the frozen fp32 `nn.Linear` layers of `model` to `dtype` in place; returns the bytes freed. `trained`:
    parameter names some stage will train (kept as they are even if frozen now). Layers under a DoRA adapter stay too
    (DoRA normalises the base weight itself: a rounded weight would change its numbers)."""
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}
    dora = {id(m.base_layer) for m in model.modules()
            if any(getattr(m, "use_dora", {}).values()) and hasattr(m, "base_layer")}
    freed = 0
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if (type(module) is not torch.nn.Linear or id(module) in dora
                or any(p.requires_grad or p.dtype != torch.float32 or id(p) in shared or
                       (f"{name}.{n}" if name else n) in trained for n, p in params)):
            continue
        for _, p in params:
            freed += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
            p.data = p.data.to(dtype)
        module.__class__ = HalfFrozenLinear
    return freed
