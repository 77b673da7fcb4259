"""lmtune: fine-tune pretrained language models on your data, with quality measured and shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lmtune import run
from lmtune.config import RunConfig, load_config
from lmtune.errors import ConfigError
from lmtune.predict import Predictor, evaluate, load
from lmtune.run import RunResult
from lmtune.rundir import config_stem

__all__ = ["ConfigError", "Predictor", "RunConfig", "RunResult", "evaluate", "load", "load_config", "train"]
__version__ = "0.1.0"


def train(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, *, resume: bool = False,
          callbacks: list[Callable] | None = None) -> Any:
    """Fine-tune as configured and write a run directory; returns a RunResult (its path and final metrics).

    With `train.seeds`, once per seed under one folder: `lmtune.studies.seeds.train_seeds` says what it returns."""
    cfg = load_config(config, overrides)
    stem = config_stem(config)
    if cfg.train.seeds:
        from lmtune.studies.seeds import train_seeds

        return train_seeds(cfg, stem, resume=resume, callbacks=callbacks)
    return run.train(cfg, resume=resume, callbacks=callbacks, stem=stem)
