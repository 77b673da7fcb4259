"""Full fine-tuning: every weight trains (optionally with layer-wise rates, gradual unfreezing, L2-SP)."""

from __future__ import annotations

from typing import Any, Literal

from lmtune.methods.stage import Method, Stage, TaskInfo
from lmtune.methods.common import FineTuneOptions, fine_tune_stages
from lmtune.registry import register_method


class FullOptions(FineTuneOptions):
    name: Literal["full"] = "full"
    """Fine-tune all weights of the backbone and the head."""
    epochs: int | None = None
    """Epochs; default: train.epochs (needed here only with gradual_unfreeze)."""


@register_method("full")
class Full(Method):
    Options = FullOptions

    @staticmethod
    def apply(model: Any, info: TaskInfo, options: FullOptions) -> list[Stage]:
        return fine_tune_stages(model, info, options, "full", lr=None, epochs=options.epochs)
