"""Tasks: each knows its data, its model head, its features and its metrics, nothing about methods.

The contract is `lmtune.tasks.base.Task` (required members, and optional capabilities that default to "not
supported"); a task subclasses it, registers itself with `@register_task("name")` and is imported below.
"""

from lmtune.registry import TASKS, register_task
from lmtune.tasks.base import Task
from lmtune.tasks import classification  # noqa: F401  (registers the built-in task)
from lmtune.tasks import ner  # noqa: F401
from lmtune.tasks import qa  # noqa: F401
from lmtune.tasks import causal_lm  # noqa: F401
from lmtune.tasks import instruct  # noqa: F401
from lmtune.tasks import regression  # noqa: F401

__all__ = ["TASKS", "Task", "register_task"]
