"""Bad-row policies and the errors of prediction inputs; DataError itself lives in lmtune.errors."""

from __future__ import annotations

from lmtune.errors import DataError


POLICIES = ("error", "skip")  # data.on_bad_rows
SKIP_HINT = "set data.on_bad_rows=skip, or lmtune eval --skip-bad-rows, to drop them"  # after an error


def no_text(record: object, row: int) -> DataError:
    """A prediction input without usable text: say whether the text was empty or which fields the row had."""
    if isinstance(record, dict) and "text" not in record:
        found = ", ".join(map(str, record)) or "none"
        return DataError("input", f"no `text` field (fields found: {found})", row=row, field="text")
    return DataError("input", "empty or missing text", row=row, field="text")
