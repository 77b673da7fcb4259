"""The errors lmtune raises for a user to act on (the CLI prints them in one line); imports nothing of lmtune."""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class ModelError(ValueError):
    """A model that cannot be found or loaded as configured."""


class DataError(ValueError):
    """Bad input data, located as precisely as we can: file, then row (or line), then field.

    ``unit`` is the word printed before the number: "row" for records, "line" where the number is a
    physical line of the file (encoding and JSON syntax errors).
    """

    def __init__(self, path: str | Path, message: str, *, row: int | None = None, field: str | None = None,
                 unit: str = "row") -> None:
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


def _rebuild_data_error(path, message, row, field, unit) -> DataError:
    return DataError(path, message, row=row, field=field, unit=unit)


class FolderError(FileExistsError):
    """An output folder that lmtune may not create, use or replace."""


class DivergedError(RuntimeError):
    """Training produced numbers that are not finite (NaN/inf) and could not go on."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from exactly."""


# What the command line reports as `error: ...` with exit status 1, without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, ModelError, FileNotFoundError, FileExistsError,
                                            ValueError, DivergedError, CheckpointError)
