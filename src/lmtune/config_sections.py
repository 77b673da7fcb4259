"""The small config sections other sections hold (data.replay, eval.reference_probe) and their common base."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from lmtune.config_read import shown


def _report(problems: list[str]) -> None:
    """A section's own checks raise once with all their problems (shown as separate lines of the config error)."""
    if problems:
        raise ValueError("\n  - ".join(problems))


class Section(BaseModel):
    # Field docstrings become descriptions (`lmtune ls`, --help); unknown keys are errors.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ReplayConfig(Section):
    path: str
    """General-domain text (.txt: one document per line, or a table with a `text` column) to mix into training."""
    ratio: float = 0.2
    """Share of the training tokens that come from the replay text (documents sampled with train.seed)."""

    @model_validator(mode="after")
    def _check(self) -> "ReplayConfig":
        if not 0 < self.ratio < 1:
            raise ValueError(f"data.replay.ratio={self.ratio}: must be in (0, 1)")
        return self


class ReferenceProbeConfig(Section):
    data: dict[str, Any]
    """The reference data as a `data` section: `train` names its file (any format lmtune reads), with the columns and
    options that file needs (`text_column`, `label_column`, `format`, ...)."""
    task: dict[str, Any] = {"name": "classification"}
    """The reference task, as a `task` section: `{name: classification}` or `{name: ner}` (with its options)."""
    max_examples: int = 1000
    """Rows of the reference file probed (a seeded sample, stratified by label for classification)."""
    folds: int = 5
    """Cross-validation folds of the probe."""

    @model_validator(mode="after")
    def _check(self) -> "ReferenceProbeConfig":
        if self.task.get("name", "classification") not in ("classification", "ner"):
            raise ValueError(f"eval.reference_probe.task.name={shown(self.task.get('name'))}: classification or ner")
        if not self.data.get("train"):
            raise ValueError("eval.reference_probe.data.train: name the reference file")
        return self  # (its data section is checked as one where EvalConfig is defined)
