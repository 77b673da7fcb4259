"""DataError: the one exception for bad input data, naming the file, row (or line) and field."""

from __future__ import annotations

from pathlib import Path


POLICIES = ("error", "skip")  # data.on_bad_rows
SKIP_HINT = "set data.on_bad_rows=skip, or lmtune eval --skip-bad-rows, to drop them"  # after an error


class DataError(ValueError):
    """Bad input data, located as precisely as we can: file, then row (or line), then field.

    ``unit`` is the word printed before the number: "row" for records, "line" where the number is a
    physical line of the file (encoding and JSON syntax errors).
    """

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        row: int | None = None,
        field: str | None = None,
        unit: str = "row",
    ) -> None:
        self.path = str(path)
        self.message = message
        self.row = row
        self.field = field
        self.unit = unit
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [self.path]
        if self.row is not None:
            where.append(f"{self.unit} {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}"

    def __reduce__(self):
        # ValueError pickles only args; keep the keyword-only fields across processes (dataloader workers).
        return (_rebuild_data_error, (self.path, self.message, self.row, self.field, self.unit))


def no_text(record: object, row: int) -> DataError:
    """A prediction input without usable text: say whether the text was empty or which fields the row had."""
    if isinstance(record, dict) and "text" not in record:
        found = ", ".join(map(str, record)) or "none"
        return DataError("input", f"no `text` field (fields found: {found})", row=row, field="text")
    return DataError("input", "empty or missing text", row=row, field="text")


def _rebuild_data_error(path, message, row, field, unit) -> DataError:
    return DataError(path, message, row=row, field=field, unit=unit)
