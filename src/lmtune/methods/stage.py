"""What a method returns: stages of training, each naming its parameter groups; and what a method may know."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class ParamGroup:
    """Parameters (by name) that share optimizer settings; None means the run's train.* value."""

    names: list[str]
    lr: float | None = None
    weight_decay: float | None = None
    lr_scale: float = 1.0  # multiplies the group's rate (layer-wise decay)


@dataclass
class Stage:
    """One phase of training: what trains, at what rate, for how long (None = the run's train.* value)."""

    name: str
    groups: list[ParamGroup]
    epochs: int | None = None
    max_steps: int | None = None
    cache_features: bool = False
    """The loop may run the frozen transformer stack once and train on its stored outputs."""
    penalty: Callable[[Any], Any] | None = None
    """Extra loss term computed from the model (e.g. L2-SP), added at every step and logged."""

    @property
    def trainable(self) -> set[str]:
        return {n for g in self.groups for n in g.names}


@dataclass
class TaskInfo:
    """What a method may know about the run: which parameters form the task head, the planned epochs."""

    head_names: list[str] = field(default_factory=list)
    epochs: int = 1
    new_names: list[str] = field(default_factory=list)
    """Weights the checkpoint did not provide (initialised at random)."""
    target_ids: list[int] = field(default_factory=list)
    """Token ids the first training rows teach a decoder to produce (its targets); empty where unknown."""


def output_layer(model: Any) -> tuple[Any, bool]:
    """A model's output layer (a decoder's LM head; None for the other heads) and whether it is tied to the input
    embeddings."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return output, output is not None and output.weight is model.get_input_embeddings().weight


def head_parameters(model: Any, info: TaskInfo, method: str) -> list[str]:
    """The task head's parameter names, for a method that trains the head alone first (head, lp_ft); refuses a
    model without one (a causal LM's output layer tied to its embeddings is no head)."""
    names = {n for n, _ in model.named_parameters()}
    found = [n for n in info.head_names if n in names]
    if found:
        return found
    if output_layer(model)[1]:
        raise ValueError(f"method {method!r}: the output layer of this {type(model).__name__} is tied to its input "
                         "embeddings, so there is no separate head to train; use full, partial or lora")
    raise ValueError(f"method {method!r} found no task-head parameters to train in this model")


class Method:
    """The method contract: `Options` (a pydantic model of its `method:` section, field `name: Literal["name"]`) and
    `apply`, required; `prepare` (methods that wrap the model) and `load_kwargs` (how the model is loaded), optional. Register a subclass with
    `@register_method("name")` (lmtune.registry)."""

    Options: type

    @staticmethod
    def apply(model: Any, info: TaskInfo, options: Any) -> list[Stage]:
        """The stages of training: which parameters train, in which groups, at what rates, for how long."""
        raise NotImplementedError

    @staticmethod
    def load_kwargs(options: Any, device: Any) -> dict[str, Any]:
        """Extra `from_pretrained` arguments for loading the model onto `device` (QLoRA's quantisation); none by
        default."""
        return {}

    @staticmethod
    def prepare(model: Any, info: TaskInfo, options: Any) -> Any:
        """The model to train, wrapped where the method needs it (peft adapters); as it is by default."""
        return model
