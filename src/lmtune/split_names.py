"""The evaluated splits' names: validation, the headline test set, the other named test sets (`test:<name>`)."""

from __future__ import annotations

from typing import Any


def eval_split_names(keys: Any) -> list[str]:
    """The evaluated splits among `keys` (a metrics dict, the splits): validation, the headline test, then the other
    named test sets (`test:<name>`) in their configured order."""
    keys = list(keys)
    return [k for k in ("validation", "test") if k in keys] + [k for k in keys if str(k).startswith("test:")]


def plot_stem(split: str) -> str:
    """A split's name in file names (plots): `test:ood` -> `test-ood`."""
    return split.replace(":", "-")
