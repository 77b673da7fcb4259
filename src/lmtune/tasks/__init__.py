"""Tasks: each knows its data, its model head, its features and its metrics, nothing about methods."""

from lmtune.registry import TASKS, register_task
from lmtune.tasks import classification  # noqa: F401  (registers the built-in task)

__all__ = ["TASKS", "register_task"]
