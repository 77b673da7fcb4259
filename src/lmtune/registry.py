"""Name -> implementation registries for tasks and methods; configs refer to these names only.

Imports nothing: the `lmtune.tasks` and `lmtune.methods` packages fill the tables when they are imported."""

from __future__ import annotations

from typing import Any, Callable

TASKS: dict[str, Any] = {}
METHODS: dict[str, Any] = {}


def _register(table: dict[str, Any], kind: str, name: str) -> Callable[[Any], Any]:
    def decorator(obj: Any) -> Any:
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice ({table[name]!r} and {obj!r})")
        if not hasattr(obj, "Options"):
            raise TypeError(f"{kind} {name!r} needs an `Options` pydantic model describing its config section")
        table[name] = obj
        return obj

    return decorator


def register_task(name: str) -> Callable[[Any], Any]:
    """Register a task class under `name` (the value of `task.name` in configs)."""
    return _register(TASKS, "task", name)


def register_method(name: str) -> Callable[[Any], Any]:
    """Register a method (an object with `Options` and `apply`) under `name` (`method.name`)."""
    return _register(METHODS, "method", name)
