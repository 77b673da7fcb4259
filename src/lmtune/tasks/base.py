"""The task contract: what every task provides, and the optional capabilities that default to "not supported"."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

if TYPE_CHECKING:
    from lmtune.config import DataConfig


MISTAKES = 20  # worst predictions kept per split


class Task(ABC):
    """A task knows its data, its model head, its features and its metrics, nothing about methods.

    Register a subclass with `@register_task("name")` (lmtune.registry); it is built as
    `Task(options, data_cfg, labels=None)` (`labels`: the label names saved in a trained model's config, when a
    finished run is loaded). Callers read the capabilities below as values (never `hasattr`): a task that has one
    sets or overrides it.
    """

    Options: ClassVar[type]
    """Pydantic model of the task's `task:` config section (its field `name: Literal["name"]`)."""
    auto_class: ClassVar[Any]
    """The transformers class its model loads with, e.g. AutoModelForSequenceClassification."""
    default_metric: str
    """The metric that selects the best checkpoint unless eval.metric says otherwise."""
    metric_names: tuple[str, ...]
    """Every scalar `evaluate` can report on validation data (eval.metric is checked against them before training)."""
    cross_entropy_targets: list[tuple[str, str]] = []
    """(model output, batch key) pairs whose training loss is cross-entropy over the last axis (targets -100
    ignored); train.label_smoothing recomputes the loss from them. Empty: the loss is something else."""

    # Optional capabilities, "not supported" unless a task says otherwise.
    pipeline_tag: ClassVar[str | None] = None
    """The Hub's name for what the model does (text-classification ...), for the model card; None: none fits."""
    mixes_replay: ClassVar[bool] = False
    """The task mixes data.replay's general text into training (other tasks refuse that option)."""
    generates: ClassVar[bool] = False
    """Predictions are generated text (`generate`), not `encode` -> forward -> `postprocess`."""
    count_targets: Callable[[dict], Any] | None = None
    """batch -> the tokens its loss averages over: the loop then weights each batch of an accumulation window by
    them (token-level losses). None: every batch weighs the same."""
    encode_report: Mapping[str, Any] = MappingProxyType({})
    """Filled by `encode` (examples dropped or truncated ...) and added to the data report of metrics.json."""

    @abstractmethod
    def __init__(self, options: Any, data: DataConfig, labels: list[str] | None = None) -> None: ...

    @abstractmethod
    def load_splits(self, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read and check the configured files, split off what is missing: ({"train"|"validation"|"test": Dataset of
        raw examples}, a JSON-able report of rows, skipped rows, labels ...). Bad input raises DataError naming file,
        row and field."""

    @abstractmethod
    def load_eval_file(self, path: str) -> Any:
        """A labelled file in the training data's format, as raw examples (`lmtune eval`)."""

    @abstractmethod
    def from_texts(self, records: list[Any]) -> Any:
        """Raw examples from prediction inputs (strings, or dicts with the task's input fields)."""

    @abstractmethod
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for loading `auto_class` (label names, number of labels ...)."""

    @abstractmethod
    def encode(self, ds: Any, tokenizer: Any, max_length: int) -> Any:
        """Features: each row has an int `length` (tokens) for length-grouped batching; the rest is the task's."""

    @abstractmethod
    def collate(self, tokenizer: Any, pad_to_multiple_of: int, max_width: int | None = None) -> Callable:
        """rows -> a dict of tensors passed to `model(**batch)` (with the targets when training: the model then
        returns `.loss`)."""

    @abstractmethod
    def evaluate(self, outputs: Any, features: Any, examples: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
        """(scalars, details) over all feature rows; `outputs` iterates (row indices, model output, batch). Scalars
        are logged at every evaluation (with "loss" where there is one); details go to metrics.json. Given
        `examples` (the rows `features` were encoded from), details also hold "mistakes": the worst predictions
        (at most MISTAKES) with their inputs, for a person to read (the run's HTML report)."""

    def postprocess(self, outputs: Any, n: int) -> list[dict[str, Any]]:
        """Predictions for `from_texts` inputs, from the model's outputs (every task that does not `generate`)."""
        raise NotImplementedError(f"{type(self).__name__} predicts by generating text (generate)")

    @abstractmethod
    def greater_is_better(self, metric: str) -> bool: ...

    def config_problem(self, tokenizer: Any, max_length: int) -> str | None:
        """What is wrong with the task's options for this tokenizer and max length (checked before any data is
        read), said naming the option; None when nothing is."""
        return None

    @property
    def generates_on_test(self) -> bool:
        """Whether a run scores generations on the test split before and after training."""
        return False

    def generate(self, model: Any, tokenizer: Any, inputs: list[Any], device: Any) -> list[dict[str, Any]]:
        """Predictions made by generating text, for inputs from `from_texts` (where `generates`)."""
        raise NotImplementedError(f"{type(self).__name__} does not generate text")

    def score_generations(self, ds: Any, generate: Callable[[list], list[dict]]) -> dict[str, Any]:
        """Metrics of generations for the raw examples `ds`; empty where the task scores none."""
        return {}

    def shape_model(self, model: Any, checkpoint: Path | None = None, weights: Path | None = None) -> None:
        """Called as soon as the task's model is loaded, before any method sees it: the head the task is configured
        for (`checkpoint`: the pretrained folder it came from); with `weights`, the saved run folder whose trained
        head comes back."""

    def prepare_model(self, model: Any) -> None:
        """Called before training, after the method wrapped the model."""

    def tune(self, session: Any, features: Any) -> dict[str, Any] | None:
        """After training, before the final evaluation: settings fitted on the validation `features` (saved with
        the model, reported in metrics.json under `tuned`); None: nothing to tune."""
        return None

    def restore(self, config: Any) -> None:
        """A finished run loaded back: what the task saved in its model's config (a temperature, target scaling)."""

    def sample_weights(self, features: Any) -> Any:
        """Per training row, the odds of drawing it in a class-balanced epoch (data.sampler: balanced); None: the
        task has no classes to balance."""
        return None

    def weighted_loss(self, weights: Any, label_smoothing: float) -> Callable[[Any, dict], Any] | None:
        """The training loss with train.class_weights (`balanced` or {label: weight}); None: the task has no
        classes to weigh."""
        return None

    def own_loss(self) -> Callable[[Any, dict], Any] | None:
        """The training loss (outputs, batch) -> scalar where it is not the model's own; None: the model's."""
        return None

    def release_model(self) -> None:
        """Called after training, to undo `prepare_model`."""
