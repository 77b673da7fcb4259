"""Full fine-tuning: every weight trains, in one stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lmtune.methods import ParamGroup, Stage, TaskInfo
from lmtune.registry import register_method


class FullOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: Literal["full"] = "full"
    """Fine-tune all weights of the backbone and the head."""
    head_lr: float | None = None
    """Learning rate of the new head; default: train.lr (the same as the backbone)."""


@register_method("full")
class Full:
    Options = FullOptions

    @staticmethod
    def apply(model: Any, info: TaskInfo, options: FullOptions) -> list[Stage]:
        head = set(info.head_names)
        names = [n for n, _ in model.named_parameters()]
        groups = [ParamGroup([n for n in names if n not in head]), ParamGroup([n for n in names if n in head],
                                                                              lr=options.head_lr)]
        return [Stage("full", [g for g in groups if g.names])]
