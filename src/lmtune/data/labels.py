"""Label cells as text, and how they meet data.label_map's keys."""

from __future__ import annotations

from typing import Any

import numpy as np


def label_text(value: Any) -> str:
    """A label cell as text. An integral float reads as the integer: one `1.0` in a JSON or CSV column makes the
    reader turn every label of it into a float, and `1.0` would not meet a `1` elsewhere (a test file, the map)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def label_renames(label_map: dict[Any, str] | None) -> dict[str, str]:
    """data.label_map keyed by label text (YAML's `0:` keys meet a file's "0" and 0.0)."""
    return {label_text(k): v for k, v in (label_map or {}).items()}


def label_map_problem(labels: set[str], label_map: dict[Any, str] | None) -> str | None:
    """What is wrong when no key of data.label_map is one of the training file's labels (as text): the map would
    rename nothing, silently. A file whose labels are the map's names already is fine."""
    keys = label_renames(label_map)
    if not keys or set(keys) & labels or labels <= set(keys.values()):
        return None
    hint = ("; YAML reads unquoted yes/no/on/off/true/false as booleans: quote such keys ('yes': positive)"
            if any(isinstance(k, bool) for k in label_map or {}) else "")
    shown = sorted(labels)
    return (f"no key of data.label_map ({', '.join(sorted(keys))}) is a label of this file (its labels: "
            f"{', '.join(shown[:10])}{', ...' if len(shown) > 10 else ''}){hint}")


def label_values(value: Any, multi: bool, sep: str, rename: dict[str, str]) -> list[str] | None:
    """A row's label(s) as strings, renamed by data.label_map; None when missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if multi and isinstance(value, list) and not value:
        return []  # multi-label: an explicit empty list means none of the labels applies (all targets 0)
    items = (value if isinstance(value, list) else str(value).split(sep)) if multi else [value]
    items = [text for text in map(label_text, items) if text]
    return [rename.get(v, v) for v in items] or None


def sort_labels(names: set[str]) -> list[str]:
    try:  # numeric labels (0/1, star ratings) in numeric order
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)
