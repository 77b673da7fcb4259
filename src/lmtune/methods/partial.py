"""Partial tuning: the head plus the top blocks, or all biases (BitFit), or all but the embeddings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from lmtune.methods.stage import Method, ParamGroup, Stage, TaskInfo
from lmtune.methods.common import parts
from lmtune.registry import register_method


class PartialOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: Literal["partial"] = "partial"
    """Train part of the backbone (top blocks, biases, or all but embeddings) with the new head."""
    train: Literal["top_layers", "bias", "no_embeddings"] = "top_layers"
    """What trains besides the head: the top `layers` blocks (and the weights above them), every bias
    (BitFit), or everything except the input embeddings."""
    layers: int = 2
    """With train=top_layers: how many blocks, counted from the top."""
    lr: float | None = None
    """Learning rate of the trained part of the backbone; default: train.lr (BitFit likes ~1e-3)."""
    head_lr: float | None = None
    """Learning rate of the head; default: the backbone part's."""


@register_method("partial")
class Partial(Method):
    Options = PartialOptions

    @staticmethod
    def apply(model: Any, info: TaskInfo, options: PartialOptions) -> list[Stage]:
        p = parts(model, info)
        if options.train == "top_layers":
            if not 1 <= options.layers <= len(p.layers):
                raise ValueError(f"method.layers={options.layers}: this model has {len(p.layers)} blocks")
            body = [n for layer in p.layers[-options.layers:] for n in layer] + p.rest
        elif options.train == "bias":
            body = [n for n in p.backbone if n.endswith("bias")]
        else:
            body = [n for layer in p.layers for n in layer] + p.rest
        if not body:  # e.g. BitFit on a model without biases (Llama): training the head alone is method `head`
            name = "bitfit (partial with train=bias)" if options.train == "bias" else f"partial (train={options.train})"
            raise ValueError(f"method {name}: this {type(model).__name__} has no such parameters to train"
                             + (" (it has no biases)" if options.train == "bias" else ""))
        groups = [ParamGroup(body, lr=options.lr), ParamGroup(p.head, lr=options.head_lr or options.lr)]
        return [Stage(f"partial-{options.train}", [g for g in groups if g.names])]


class BitFitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _saved_by_partial(cls, data: Any) -> Any:
        """Runs saved before bitfit had options of its own wrote partial's `train: bias` and `layers`."""
        if isinstance(data, dict) and data.get("train") == "bias":
            data = {k: v for k, v in data.items() if k not in ("train", "layers")}
        return data

    name: Literal["bitfit"] = "bitfit"
    """BitFit: train only the biases of the backbone, and the new head."""
    lr: float | None = None
    """Learning rate of the biases; default: train.lr (BitFit likes ~1e-3)."""
    head_lr: float | None = None
    """Learning rate of the head; default: the biases'."""


@register_method("bitfit")
class BitFit(Method):
    """`bitfit` is `partial` with train=bias, under the name the literature uses."""

    Options = BitFitOptions

    @staticmethod
    def apply(model: Any, info: TaskInfo, options: BitFitOptions) -> list[Stage]:
        return Partial.apply(model, info, PartialOptions(train="bias", lr=options.lr, head_lr=options.head_lr))
