"""train.compile: each transformer block compiled in place for a training stage, and undone after it."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


def blocks(model: Any) -> list[Any]:
    """Compile each transformer block in place, or the whole model where it has no block stack; returns them.

    In place (nn.Module.compile): parameter names, state dicts and saving stay as they are. The blocks of a stack
    share their code, so one compilation serves them all (minutes less than compiling the whole model), and the
    fused element-wise work inside them is most of what compiling gains."""
    from lmtune.models import ModelError, find_layers

    try:
        modules = list(find_layers(model)[1])
    except ModelError:
        modules = [model]
    if _first_block_trains(modules) and hasattr(model, "enable_input_require_grads"):
        # With frozen embeddings (adapters) the first block's input would not require grad and the others' would:
        # two compilations. The embeddings' output requiring grad costs one extra product. Not where the first
        # block is frozen (top layers only): backward would then run through every frozen block.
        model.enable_input_require_grads()
    for module in modules:
        # Dynamic from the start: the batch shapes vary (dynamic padding, the short last batch of an epoch, met
        # anywhere in a shuffled epoch), and each recompilation of a block stalls training for seconds.
        module.compile(dynamic=True)
    return modules


@contextlib.contextmanager
def plain(modules: list[Any]) -> Iterator[None]:
    """Run `modules` uncompiled inside the block (evaluation during a stage)."""
    calls = [(m, m._compiled_call_impl) for m in modules]
    for module, _ in calls:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in calls:
            module._compiled_call_impl = call


def release(modules: list[Any], model: Any) -> None:
    """Back to the plain model after a stage (evaluation and generation run uncompiled)."""
    for module in modules:
        module._compiled_call_impl = None
    if _first_block_trains(modules) and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def _first_block_trains(modules: list[Any]) -> bool:
    return len(modules) > 1 and any(p.requires_grad for p in modules[0].parameters())
