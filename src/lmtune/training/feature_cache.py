"""Frozen-trunk feature cache: run the frozen transformer stack once, then serve its outputs from memory."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("lmtune")


class FeatureCache:
    """Serves a frozen module's outputs (the block stack and its container) from memory.

    Outputs are stored per dataset row as the hidden states of the real (attention-mask) tokens only,
    flattened into one tensor, and scattered back into the current batch's padded shape, so any
    padding side and any batch composition is served exactly. The module's `forward` is replaced on
    the instance (parameter names, state dicts and hooks stay as they are) and restored by `remove`.
    """

    def __init__(self, trunk: torch.nn.Module) -> None:
        self.trunk = trunk
        self.tables: dict[str, tuple[torch.Tensor, list[int]]] = {}
        self.output_type: Any = None
        self.current: tuple[str, list[int], torch.Tensor] | None = None  # (table, rows, attention mask)
        trunk.forward = self._forward  # type: ignore[method-assign]

    def remove(self) -> None:
        del self.trunk.forward  # back to the class's forward

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.current is None:
            return type(self.trunk).forward(self.trunk, *args, **kwargs)
        key, rows, mask = self.current
        flat, offsets = self.tables[key]
        pieces = torch.cat([flat[offsets[r]:offsets[r + 1]] for r in rows]).to(mask.device, non_blocking=True)
        hidden = pieces.new_zeros((*mask.shape, flat.shape[-1]))
        hidden[mask.bool()] = pieces
        return self.output_type(last_hidden_state=hidden)

    def build(self, key: str, batches: Any, run: Callable[[dict], Any], n_rows: int) -> None:
        """Store the trunk's output for every row; `batches` yields (row indices, batch with attention_mask)."""
        captured: list[Any] = []
        handle = self.trunk.register_forward_hook(lambda _m, _i, out: captured.append(out))
        per_row: list[Any] = [None] * n_rows
        try:
            with torch.inference_mode():
                for rows, batch in batches:
                    captured.clear()
                    run(batch)
                    out = captured[-1]
                    self.output_type = type(out)
                    mask = batch["attention_mask"].to(out.last_hidden_state.device).bool()
                    for i, row in enumerate(rows):
                        per_row[row] = out.last_hidden_state[i][mask[i]].to("cpu")
        finally:
            handle.remove()
        offsets = [0]
        for piece in per_row:
            offsets.append(offsets[-1] + piece.shape[0])
        flat = torch.cat(per_row)
        if torch.cuda.is_available():
            flat = flat.pin_memory()  # fast copies of each batch's slice to the GPU
        self.tables[key] = (flat, offsets)
        log.info("cached frozen features of %d rows (%d tokens, %.0f MB)", n_rows, flat.shape[0],
                 flat.numel() * flat.element_size() / 2**20)


def install(model: Any, layers_name: str, trainable: set[str]) -> FeatureCache | str:
    """Cache the module that holds the block stack (e.g. bert.encoder, model.model) if all of it is frozen.

    Returns the cache, or the reason caching cannot apply.
    """
    container = layers_name.rpartition(".")[0]
    if not container:
        return "the block stack sits directly on the model; nothing to cache around it"
    training = [n for n in trainable if n.startswith(container + ".")]
    if training:
        return f"{len(training)} parameters inside {container} train (e.g. {training[0]})"
    return FeatureCache(model.get_submodule(container))


def find(model: Any) -> FeatureCache | None:
    return next((m.forward.__self__ for m in model.modules()
                 if isinstance(getattr(m.forward, "__self__", None), FeatureCache)), None)
