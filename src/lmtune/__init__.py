"""lmtune: fine-tune pretrained language models on your data, with quality measured and shown."""

from lmtune.config import ConfigError, RunConfig, load_config
from lmtune.run import Predictor, RunResult, evaluate, load, train

__all__ = ["ConfigError", "Predictor", "RunConfig", "RunResult", "evaluate", "load", "load_config", "train"]
__version__ = "0.1.0"
