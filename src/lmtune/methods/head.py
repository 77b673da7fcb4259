"""Head only: the backbone stays frozen and only the new task head trains."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lmtune.methods.stage import head_parameters, Method, ParamGroup, Stage, TaskInfo
from lmtune.registry import register_method


class HeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: Literal["head"] = "head"
    """Train a new task head on a frozen backbone (fast; keeps the backbone's knowledge intact)."""
    lr: float | None = None
    """Learning rate of the head; default: train.lr. Heads on frozen features usually want 1e-3 or more."""
    cache_features: bool = True
    """Run the frozen transformer stack once and train the head on its stored outputs (several times faster: benchmarks/RESULTS.md).
    The stored features come from the stack in eval mode (no dropout inside the backbone); set false to
    run the backbone every step instead (its dropout then applies, as in plain frozen training)."""


@register_method("head")
class Head(Method):
    Options = HeadOptions

    @staticmethod
    def apply(model: Any, info: TaskInfo, options: HeadOptions) -> list[Stage]:
        head = head_parameters(model, info, "head")
        return [Stage("head", [ParamGroup(head, lr=options.lr)], cache_features=options.cache_features)]
