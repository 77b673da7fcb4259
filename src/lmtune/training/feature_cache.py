"""Frozen-trunk feature cache: run the frozen part of the network once, then serve its outputs from memory."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

log = logging.getLogger("lmtune")

# Share of the GPU's free memory a table may take; larger tables stay in (pinned) host memory.
GPU_SHARE = 0.5


@dataclass
class _Table:
    """One dataset's stored outputs, rows in the order they were computed (not dataset order)."""

    tokens: dict[str, torch.Tensor]  # field -> [real tokens of all rows, ...]
    rows: dict[str, torch.Tensor]    # field -> [rows, ...]
    starts: np.ndarray               # row r's tokens are tokens[starts[r]:starts[r] + counts[r]]
    counts: np.ndarray
    position: np.ndarray             # row r's per-row fields are rows[position[r]]


class FeatureCache:
    """Serves a frozen module's outputs (the block stack and whatever frozen modules hold it) from memory.

    Per-token outputs (e.g. `last_hidden_state`) are stored for the real (attention-mask) tokens only and
    scattered back into the current batch's padded shape, so any padding side and any batch composition is
    served exactly; per-row outputs (e.g. BERT's `pooler_output`) are stored per row. The module's `forward`
    is replaced on the instance (parameter names, state dicts and hooks stay as they are) and restored by
    `remove`. Serving a batch is a few indexing kernels and no Python loop over rows: a head trained on
    the cache costs little more than the head itself.
    """

    def __init__(self, trunk: torch.nn.Module, name: str) -> None:
        self.trunk, self.name = trunk, name
        self.tables: dict[str, _Table] = {}
        self.output_type: Any = None
        self.current: dict[str, torch.Tensor] | None = None  # what a forward returns (see serving); None: run
        trunk.forward = self._forward  # type: ignore[method-assign]

    def remove(self) -> None:
        del self.trunk.forward  # back to the class's forward
        self.tables.clear()

    @contextlib.contextmanager
    def serving(self, fields: dict[str, torch.Tensor]) -> Iterator[None]:
        """Forwards inside the block return `fields` (from `serve`) instead of running the trunk; it runs after."""
        self.current = fields
        try:
            yield
        finally:
            self.current = None

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.current is None:
            return type(self.trunk).forward(self.trunk, *args, **kwargs)
        return self.output_type(**self.current)

    def serve(self, key: str, rows: list[int], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored outputs of dataset `key`'s `rows`, on the trunk's device and in the padded shape of `mask`
        (the batch's attention mask, on the host), for `serving`."""
        table = self.tables[key]
        device = next(self.trunk.parameters()).device
        starts, counts = table.starts[rows], table.counts[rows]
        # Where the rows' tokens sit in the flat table, row after row, and where they go in the padded batch:
        # both computed on the host, so serving a batch never waits for the GPU.
        source = torch.from_numpy(np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum()))
        target = to_device_async(mask.bool().flatten().nonzero().squeeze(1), device)
        fields: dict[str, Any] = {}
        for field, flat in table.tokens.items():
            pieces = to_device_async(flat[to_device_async(source, flat.device)], device)
            padded = pieces.new_zeros((mask.numel(), *flat.shape[1:]))
            fields[field] = padded.index_copy_(0, target, pieces).view(*mask.shape, *flat.shape[1:])
        positions = torch.from_numpy(table.position[rows])
        for field, stacked in table.rows.items():
            fields[field] = to_device_async(stacked[to_device_async(positions, stacked.device)], device)
        return fields

    def build(self, key: str, batches: Any, run: Callable[[dict], Any], n_rows: int, n_tokens: int,
              device: torch.device) -> None:
        """Store the trunk's output for every row; `batches` yields (row indices, batch with attention_mask).

        `n_tokens` (the real tokens of all rows) sizes the table after the first batch, to decide whether
        it stays on the GPU or goes to host memory batch by batch.
        """
        captured: list[Any] = []
        handle = self.trunk.register_forward_hook(lambda _m, _i, out: captured.append(out))
        tokens: dict[str, list[torch.Tensor]] = {}
        per_row: dict[str, list[torch.Tensor]] = {}
        starts, counts, position = (np.zeros(n_rows, dtype=np.int64) for _ in range(3))
        done_tokens = done_rows = 0
        keep: torch.device | None = None
        try:
            with torch.inference_mode():
                for rows, batch in batches:
                    captured.clear()
                    run(batch)
                    out = captured[-1]
                    self.output_type = type(out)
                    mask = batch["attention_mask"].to(device).bool()
                    sizes = batch["attention_mask"].sum(1).numpy()
                    if keep is None:
                        keep = self._where(out, mask, sizes, n_rows, n_tokens, device)
                    for field, value in out.items():
                        if not torch.is_tensor(value):  # e.g. a decoder's key/value cache
                            continue
                        if _per_token(value, mask):
                            tokens.setdefault(field, []).append(value[mask].to(keep))
                        elif value.shape[0] == mask.shape[0]:
                            per_row.setdefault(field, []).append(value.to(keep))
                    starts[rows] = done_tokens + np.cumsum(sizes) - sizes
                    counts[rows] = sizes
                    position[rows] = done_rows + np.arange(len(rows))
                    done_tokens, done_rows = done_tokens + int(sizes.sum()), done_rows + len(rows)
        finally:
            handle.remove()
        table = _Table({f: torch.cat(v) for f, v in tokens.items()}, {f: torch.cat(v) for f, v in per_row.items()},
                       starts, counts, position)
        if keep is not None and keep.type == "cpu" and device.type == "cuda":
            for store in (table.tokens, table.rows):
                for field, tensor in store.items():
                    store[field] = tensor.pin_memory()  # fast copies of each batch's share to the GPU
        self.tables[key] = table
        size = sum(t.numel() * t.element_size() for t in (*table.tokens.values(), *table.rows.values()))
        log.info("cached frozen features of %d rows (%d tokens, %.0f MB, %s) from %s", n_rows, done_tokens,
                 size / 2**20, "on the GPU" if keep is not None and keep.type == "cuda" else "in host memory",
                 self.name)

    @staticmethod
    def _where(out: Any, mask: torch.Tensor, sizes: np.ndarray, n_rows: int, n_tokens: int,
               device: torch.device) -> torch.device:
        """The GPU when the whole table (estimated from the first batch) fits comfortably, else the host."""
        if device.type != "cuda":
            return torch.device("cpu")
        per_token = sum(v[0, 0].numel() * v.element_size() for v in out.values()
                        if torch.is_tensor(v) and _per_token(v, mask))
        per_row = sum(v[0].numel() * v.element_size() for v in out.values()
                      if torch.is_tensor(v) and not _per_token(v, mask) and v.shape[0] == mask.shape[0])
        size = per_token * n_tokens + per_row * n_rows
        return device if size < GPU_SHARE * torch.cuda.mem_get_info(device)[0] else torch.device("cpu")


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without stalling: a copy from pageable memory waits for the GPU to catch up
    (a sync per served batch), one from pinned memory is queued like a kernel."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _per_token(value: torch.Tensor, mask: torch.Tensor) -> bool:
    """(batch, tokens, features...) outputs; a (batch, features) one whose width happens to equal the padded
    length (BERT's pooler output at hidden size 384 in a batch padded to 384) is per row."""
    return value.ndim >= 3 and value.shape[:2] == mask.shape


def install(model: Any, layers_name: str, trainable: set[str]) -> FeatureCache | str:
    """Cache the outermost frozen module around the block stack (e.g. `bert`, `model`) if the stack is frozen.

    The stack's own container (e.g. `bert.encoder`) must be frozen; going further out (embeddings, pooler,
    final norm) saves their work too, as long as nothing inside trains. The model itself is never cached.
    Returns the cache, or the reason caching cannot apply.
    """
    container = layers_name.rpartition(".")[0]
    if not container:
        return "the block stack sits directly on the model; nothing to cache around it"
    training = [n for n in trainable if n.startswith(container + ".")]
    if training:
        return f"{len(training)} parameters inside {container} train (e.g. {training[0]})"
    parts = container.split(".")
    for depth in range(1, len(parts) + 1):  # outermost first
        name = ".".join(parts[:depth])
        if not any(n.startswith(name + ".") for n in trainable):
            return FeatureCache(model.get_submodule(name), name)
    raise AssertionError("unreachable: the container itself is frozen")


def find(model: Any) -> FeatureCache | None:
    return next((m.forward.__self__ for m in model.modules()
                 if isinstance(getattr(m.forward, "__self__", None), FeatureCache)), None)
