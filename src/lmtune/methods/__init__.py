"""Tuning methods: each decides which parameters train, in which stages, knowing nothing about tasks.

A method is one module here registered with `@register_method("name")`: an `Options` pydantic model (its `method:`
section) and `apply(model, task_info, options) -> list[Stage]`; optionally `prepare(model, task_info, options)`
returning a wrapped model (peft adapters). Importing this package registers the built-in ones.
"""

from __future__ import annotations

from lmtune.methods import full, head, lora, lp_ft, partial  # noqa: F401  (register the built-in methods)
from lmtune.methods.stage import Method, ParamGroup, Stage, TaskInfo, head_parameters
from lmtune.registry import METHODS, register_method

__all__ = ["METHODS", "Method", "ParamGroup", "Stage", "TaskInfo", "head_parameters", "register_method"]
