"""Tuning methods: each decides which parameters train, in which stages, knowing nothing about tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmtune.registry import METHODS, register_method


@dataclass
class ParamGroup:
    """Parameters (by name) that share optimizer settings; None means the run's train.* value."""

    names: list[str]
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class Stage:
    """One phase of training: what trains, at what rate, for how long (None = the run's train.* value)."""

    name: str
    groups: list[ParamGroup]
    epochs: int | None = None
    max_steps: int | None = None

    @property
    def trainable(self) -> set[str]:
        return {n for g in self.groups for n in g.names}


@dataclass
class TaskInfo:
    """What a method may know about the task's model: which parameters form the task head."""

    head_names: list[str] = field(default_factory=list)


from lmtune.methods import full, head  # noqa: E402,F401  (register the built-in methods)

__all__ = ["METHODS", "ParamGroup", "Stage", "TaskInfo", "register_method"]
