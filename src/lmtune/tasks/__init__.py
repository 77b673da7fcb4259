"""Tasks: each knows its data, its model head, its features and its metrics, nothing about methods.

A task is a class registered with `@register_task("name")`, constructed as
`Task(options, data_cfg, labels=None)` (labels: the label names saved in a trained model's config, when
loading a finished run). It provides, duck-typed (no base class):

- `Options`: pydantic model of its `task:` config section (field `name: Literal["name"]`).
- `load_splits(seed) -> (splits, report)`: read and check the configured files, split off what is
  missing; `splits` maps "train"/"validation"/"test" to `datasets.Dataset`s of raw examples, `report`
  is a JSON-able dict for metrics.json (rows, skipped rows, labels, ...). Bad input raises
  `lmtune.data.DataError` naming file, row and field.
- `load_eval_file(path) -> Dataset` (for `lmtune eval`) and `from_texts(records) -> Dataset` (predict).
- `auto_class` (e.g. `AutoModelForSequenceClassification`) and `model_kwargs() -> dict` for loading.
- `encode(ds, tokenizer, max_length) -> Dataset` of features; each row has an int `length` (tokens)
  used for length-grouped batching; other columns are the task's business.
- `collate(tokenizer, pad_to_multiple_of) -> fn(rows) -> dict of tensors` passed to `model(**batch)`
  (with `labels` when training, so that the model returns `.loss`).
- `evaluate(outputs, features) -> (scalars, details)`: `outputs` iterates `(row indices, model output,
  batch)` over all feature rows; scalars (floats, logged at every evaluation, include "loss" when
  available) and details (per-class tables, matrices; saved in metrics.json).
- `postprocess(outputs, n) -> list[dict]`: predictions for `from_texts` inputs.
- `default_metric`, `metric_names` (every scalar `evaluate` can report on validation data, for `eval.metric`
  to be checked before training) and `greater_is_better(metric) -> bool`.
- `cross_entropy_targets`: (model output, batch key) pairs whose training loss is cross-entropy over the
  last axis of the output (targets -100 ignored); `train.label_smoothing` recomputes the loss from them.
  Empty when the loss is something else (multi-label: sigmoid per label).

Optional, for tasks that need them:
- `config_problem(tokenizer, max_length) -> str | None`: what is wrong with the task's options for this tokenizer
  and max length (QA and NER windows), said naming the option; `lmtune.preflight.check_setup` reports it (for
  `validate` and `train`) before any data is read, and `encode` raises it as a ConfigError.
- `mixes_replay = True`: the task mixes `data.replay` text into training; other tasks refuse that option.
- `count_targets(batch) -> int tensor`: the tokens a batch's loss averages over; the loop then weights each
  micro-batch so an optimizer step's loss is the mean over every target token of its accumulation window
  (or, with `train.loss_normalization=dataset`, their sum over the training set's mean count per window).
- `generate(model, tokenizer, inputs, device) -> list[dict]`: predictions made by generating text (used by
  `Predictor.predict` instead of `encode` -> forward -> `postprocess`; `inputs` come from `from_texts`).
- `score_generations(ds, generate) -> dict | None`: metrics of generations for the raw examples `ds`
  (from `load_splits`/`load_eval_file`); `generate(inputs) -> list[dict]` wraps the model.
- `prepare_model(model)` / `release_model()`: called before and after training (the causal-LM tasks turn the
  key/value cache off and install their memory-lean loss, then undo both).
- `encode_report`: a dict filled by `encode` (dropped / truncated examples), added to the data report.
"""

from lmtune.registry import TASKS, register_task
from lmtune.tasks import classification  # noqa: F401  (registers the built-in task)
from lmtune.tasks import ner  # noqa: F401
from lmtune.tasks import qa  # noqa: F401
from lmtune.tasks import causal_lm  # noqa: F401
from lmtune.tasks import instruct  # noqa: F401

__all__ = ["TASKS", "register_task"]
