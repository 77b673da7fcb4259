"""Generic, task-independent data reading: files to datasets, row checks, splits and subsets."""

from lmtune.data.checks import apply_row_checks
from lmtune.data.errors import no_text
from lmtune.data.padding import pad_inputs
from lmtune.data.readers import DataError, read_table, require_columns, resolve_path
from lmtune.data.splits import (carve_splits, count_overlap, group_values, listed_groups, split_off, split_off_groups,
                                stratified_subset)

__all__ = [
    "DataError",
    "apply_row_checks",
    "carve_splits",
    "count_overlap",
    "group_values",
    "listed_groups",
    "no_text",
    "pad_inputs",
    "read_table",
    "require_columns",
    "resolve_path",
    "split_off",
    "split_off_groups",
    "stratified_subset",
]
