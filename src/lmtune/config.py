"""Typed run configuration: YAML + dotted overrides -> validated RunConfig, with clear errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, SerializeAsAny, ValidationError, model_validator

from lmtune.config_sections import ReferenceProbeConfig, ReplayConfig, Section, _report
from lmtune.config_read import (ALIASES, _alias_growth_problem, _clip, _closest, _format_errors, _validate_registered,
                                alias_growth_exceeds, override, read_yaml, shown)
from lmtune.errors import ConfigError
from lmtune.files import name_problem
from lmtune.registry import METHODS, TASKS


class ModelConfig(Section):
    name: str = "minilm-l6"
    """Pretrained model: a built-in name (see `lmtune ls`), a local Hugging Face model folder, or a Hub id
    (`org/name`, `org/name@revision`: fetched once into the HF cache, recorded as the commit it resolved to)."""
    max_length: int | None = None
    """Longest input in tokens: classification and instruct truncate longer inputs, NER and QA cut them into
    overlapping windows, causal_lm packs documents into rows of this length. Default: the model's own limit (at
    most 512)."""
    allow_pickle: bool = False
    """Allow loading pickled `.bin` weights (can run arbitrary code); safetensors only otherwise."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model folder to run."""
    dropout: float | None = None
    """Override the model's dropout probabilities (hidden, attention, classifier); null = the model's own."""

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        problems = []
        if self.max_length is not None and self.max_length < 8:
            problems.append(f"model.max_length={self.max_length} is too small (at least 8 tokens)")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append(f"model.dropout={self.dropout}: must be in [0, 1)")
        _report(problems)
        return self


# What a named test set may set for its own file (data.test: {name: {path: FILE, ...}})
TEST_SET_KEYS = {"format", "quoting", "text_column", "text_pair_column", "label_column", "label_map",
                 "label_separator", "unescape_html"}


class DataConfig(Section):
    @model_validator(mode="after")
    def _check_tests(self) -> "DataConfig":
        if isinstance(self.test, dict):
            if not self.test:
                raise ValueError("data.test: an empty mapping; give a file, or {name: file} for each test set")
            bad = [n for n in self.test if not n or ":" in n or "/" in n or n != n.strip()]
            if bad:
                raise ValueError(f"data.test: test set name {bad[0]!r}: names are non-empty, without ':' or '/'")
            for name, given in self.test.items():
                if isinstance(given, dict):
                    if not isinstance(given.get("path"), str):
                        raise ValueError(f"data.test.{name}: give `path` (the file) beside the columns it changes")
                    if unknown := sorted(set(given) - {"path"} - TEST_SET_KEYS):
                        raise ValueError(f"data.test.{name}.{unknown[0]}: a test set may set only "
                                         f"{', '.join(sorted(TEST_SET_KEYS))} (beside `path`)")
                    own = {k: v for k, v in given.items() if k != "path"}
                    try:  # its settings as the data section would take them
                        DataConfig.model_validate({**self.model_dump(exclude={"test"}), **own})
                    except ValidationError as err:
                        first = err.errors()[0]
                        raise ValueError(f"data.test.{name}.{'.'.join(map(str, first['loc']))}: "
                                         f"{first['msg']}") from None
        return self

    def test_sets(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(split key, set name, file, data settings of its own) of each configured test file: `test` first, then
        `test:<name>`."""
        if not isinstance(self.test, dict):
            return [("test", "test", self.test, {})] if self.test else []
        out = []
        for i, (name, given) in enumerate(self.test.items()):
            path, own = (given["path"], {k: v for k, v in given.items() if k != "path"}) if isinstance(given, dict) \
                else (given, {})
            out.append(("test" if i == 0 else f"test:{name}", name, path, own))
        return out

    train: str | None = None
    """Training file (csv, tsv, jsonl, json, parquet, optionally .gz) or `builtin:NAME/FILE`."""
    validation: str | None = None
    """Validation file; when absent, `validation_size` of train is split off (seeded; stratified by label for
    single-label classification)."""
    test: str | dict[str, str | dict[str, Any]] | None = None
    """Test file; or several named test sets `{name: file}` (e.g. in-domain and out-of-domain files), each
    evaluated and reported under its name: the first is the headline `test`, the others `test:<name>`; a set whose
    file has other columns gives them, `{path: FILE, text_column: text, label_map: {...}}`. When absent,
    `test_size` of train is split off (seeded; stratified by label for single-label classification)."""
    format: Literal["csv", "tsv", "jsonl", "json", "parquet"] | None = None
    """File format; default: from the file extension."""
    quoting: Literal["csv", "none"] = "csv"
    """CSV/TSV: `csv` reads double quotes as quoting (a quoted field may hold the delimiter); `none` reads them as
    plain characters (files such as STS-B, whose texts open with a quote that never closes)."""
    text_column: str = "text"
    """Column holding the input text."""
    text_pair_column: str | None = None
    """Column holding the second text of a sentence pair (e.g. NLI hypothesis), if any."""
    label_column: str | list[str] = "label"
    """Column holding the label (for multi-label: a list, or a string split on `label_separator`); regression: the
    target column, or a list of several."""
    labels: list[str] | None = None
    """Label names in index order; default: discovered from the training data (sorted)."""
    label_map: dict[str | int | float | bool, str] | None = None
    """Rename raw label values before anything else, e.g. {0: negative, 1: positive}; others stay as they are (with
    a warning). Labels are compared as text, 1.0 as 1; a map none of whose keys is a label of the training file is
    refused (YAML reads unquoted yes/no keys as booleans: quote them)."""
    label_separator: str = ","
    """Separator of labels in a multi-label string column."""
    validation_size: float = 0.1
    """Fraction (0-1) or row count of train split off as validation when no validation file is given."""
    test_size: float = 0.1
    """Fraction (0-1) or row count of train split off as test when no test file is given; 0 = no test."""
    split_by: str | None = None
    """Split validation/test off by whole groups of this column (e.g. article title), not by row; sizes count groups.
    Classification and QA: any column; NER: `document` (CoNLL files); not for the causal-LM tasks."""
    max_train_samples: int | None = None
    """Train on a seeded subset of this many rows (a manageable part of a big dataset; stratified by label for
    single-label classification)."""
    max_eval_samples: int | None = None
    """Evaluate on a seeded subset of this many validation/test rows (stratified as max_train_samples)."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """What to do with a bad row (empty text, missing/unknown label): stop with an error, or skip and count it."""
    sampler: Literal["random", "balanced"] = "random"
    """Single-label classification: `balanced` draws each epoch's rows with replacement, every class equally often
    on average (`random`: every row once, shuffled)."""
    unescape_html: bool = False
    """Classification: turn HTML entities such as `&#039;` into characters before tokenizing (scraped reviews)."""
    replay: ReplayConfig | None = None
    """Causal-LM tasks: mix general text into training to reduce forgetting, e.g. {path: wiki.txt, ratio: 0.2}."""

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        problems = []
        for name in ("validation_size", "test_size"):
            value = getattr(self, name)
            if value < 0 or (value >= 1 and value != int(value)):
                problems.append(f"data.{name}={value}: give a fraction in [0, 1) or a whole row count")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"data.{name}={value}: must be at least 1 (or left out for all rows)")
        _report(problems)
        return self


class TrainConfig(Section):
    epochs: int = 3
    """Passes over the training data (per stage unless the method sets its own)."""
    max_steps: int | None = None
    """Stop each stage after this many optimizer steps; overrides `epochs` when given (a two-stage method
    such as lp_ft runs up to twice as many in all)."""
    batch_size: int = 16
    """Examples per forward pass (per device)."""
    grad_accum: int = 1
    """Forward passes whose gradients are summed before one optimizer step."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases and LayerNorm weights."""
    warmup_ratio: float = 0.1
    """Share of each stage's steps spent warming the learning rate up from 0."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; null = no clipping."""
    max_skipped_steps: int = 10
    """An optimizer step whose gradients are not finite (NaN/inf: a diverging run, a bad batch) is skipped on the
    device and counted; this many skipped in a row stop the run with an error (its last checkpoint kept)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast precision: auto = bf16 on a GPU that supports it, else fp32."""
    seed: int = 42
    """Seed for splits, sampling, initialisation and dropout."""
    seeds: list[int] | None = None
    """Train once per seed (each run sets `seed`) and report mean, std, min and max of every metric."""
    label_smoothing: float = 0.0
    """Share of the target probability spread over all classes in the training loss (cross-entropy tasks); 0.1 is
    the usual choice (measured: benchmarks/RESULTS.md)."""
    class_weights: Literal["balanced"] | dict[str, float] | None = None
    """Classification: weigh each class in the training loss, `balanced` (rows / (classes x the class's rows);
    multi-label: each label's positives by negatives / positives, BCE's pos_weight) or {label: weight} (others 1)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, faster), order still shuffled."""
    loss_normalization: Literal["batch", "dataset"] = "batch"
    """Token-level tasks (NER, causal LM, instructions): `batch` makes a step's loss the mean over its own
    target tokens; `dataset` divides their summed loss by the mean target count per step over the training
    set, so every token weighs the same whichever batch it lands in (with length-grouped batches a batch of
    short rows otherwise gives each of its tokens more weight). Other tasks: no effect."""
    pad_to_multiple_of: int | None = None
    """Pad each batch to a multiple of this many tokens (tensor-core friendly). Default: 8 on a CPU; on a GPU
    the max length / 8, rounded up to a multiple of 8 (at most 8 batch widths: each new width costs an eager
    step and a CUDA-graph recording; measured: benchmarks/RESULTS.md)."""
    eval_every: int | None = None
    """Evaluate (and checkpoint) every N optimizer steps; null = at the end of every epoch."""
    log_every: int = 10
    """Log the training loss every N optimizer steps."""
    early_stopping_patience: int | None = None
    """Stop a stage after this many evaluations without improvement; null = never stop early."""
    early_stopping_min_delta: float = 0.0
    """Smallest change of the selection metric that counts as an improvement."""
    ema_decay: float | None = None
    """Keep an exponential moving average of each stage's trained weights (buffers not averaged) and evaluate,
    select and save it in place of the weights themselves (with load_best=false or no validation data, the saved
    model is the last average); validation losses are then the average's, training losses the weights'. Up to step
    decay / (1 - decay) it is a plain mean of the stage's weights so far, early ones included: pick a decay with
    1 / (1 - decay) well under the stage's steps. Memory: one more copy of the trainable weights. null = off.
    What it gained on SST-2: benchmarks/RESULTS.md."""
    load_best: bool = True
    """At the end, restore the weights of the best evaluation (by `eval.metric`)."""
    checkpoint: bool = True
    """Save a resumable checkpoint (model, optimizer, scheduler, RNG, data position) at each evaluation."""
    num_workers: int = 0
    """DataLoader worker processes."""
    compile: bool = False
    """Compile each transformer block with torch.compile (in place, shapes dynamic; not for stages on cached
    features; evaluation runs plain). Fuses the element-wise work around the matrix products: faster once compiled,
    after a start of tens of seconds, so for long runs (measured: benchmarks/RESULTS.md). A one-row last
    batch joins the batch before it (a batch of one row would compile everything again)."""
    cuda_graphs: bool = True
    """On one CUDA device (bf16 or fp32), record each batch shape's training step
    (forward, backward, clipping, AdamW) as a CUDA graph on its second occurrence and replay it from then on: a
    small model's step is bound by kernel-launch overhead, which replaying removes. Steps that cannot be recorded
    run eagerly (logged). Costs memory: the recorded steps' activations stay reserved."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input during the forward and recompute the rest in backward: much less activation
    memory for about a third more compute (long rows, large models)."""

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "max_skipped_steps": self.max_skipped_steps,
                    "pad_to_multiple_of": self.pad_to_multiple_of or 1}
        problems = [f"train.{name}={value}: must be at least 1" for name, value in positive.items() if value < 1]
        if self.lr <= 0:
            problems.append(f"train.lr={self.lr}: must be positive")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"train.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append(f"train.ema_decay={self.ema_decay}: must be in (0, 1), or null for no average")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"train.label_smoothing={self.label_smoothing}: must be in [0, 1)")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            problems.append(f"train.seeds={shown(self.seeds)}: give distinct seeds (or null for the one train.seed)")
        for name in ("max_steps", "eval_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"train.{name}={value}: must be at least 1 (or null)")
        _report(problems)
        return self


class EvalConfig(Section):
    metric: str | None = None
    """Metric that selects the best checkpoint and drives early stopping, one of those the task reports on
    validation (checked before training); default: the task's main metric."""
    batch_size: int | None = None
    """Examples per evaluation batch (default: twice train.batch_size); batches of shorter rows take more of them,
    up to the padded tokens of a batch of the longest rows."""
    test: bool = True
    """Evaluate the final model on the test split and report it."""
    general_text: str | None = None
    """Forgetting probe (causal LMs): perplexity on this general-domain .txt file before and after training."""
    general_text_max_documents: int | None = None
    """Forgetting probe: use at most this many documents (lines) of general_text, the first ones."""
    general_chat: str | None = None
    """Forgetting probe (decoders with a chat template): instruction/reply pairs the run does not train on, in any
    format `instruct` reads; the per-token loss of the replies before and after training, and a few greedy replies."""
    general_chat_max_examples: int = 200
    """general_chat: the first this many conversations (the first 5 are also answered by greedy generation)."""
    reference_probe: ReferenceProbeConfig | None = None
    """Encoders' forgetting probe: a linear probe on the backbone's frozen features for a labelled reference task,
    fitted and scored before training and again after; the drop is the run's representation forgetting."""
    calibrate: Literal["temperature"] | None = None
    """Classification (one label a text): after training, fit one temperature on the validation rows (minimising
    NLL) that divides the logits; saved with the model and used by predict, eval and serve. Metrics report ECE
    before and after; accuracy is unchanged."""

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if self.reference_probe is not None:
            try:
                DataConfig.model_validate(self.reference_probe.data)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(map(str, first["loc"]))
                raise ValueError(f"eval.reference_probe.data.{where}: {first['msg']}") from None
        return self


class OutputConfig(Section):
    dir: str = "runs"
    """Folder that holds run directories."""
    name: str | None = None
    """Run directory name; default: `<config file name>-<date>-<time>`."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = ["tensorboard"]
    """Experiment trackers that get the config, every logged metric, the final metrics and the run's files (mlflow,
    wandb: optional extras, `pip install 'lmtune[mlflow]'`); [] = metrics.jsonl only."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; default: MLFLOW_TRACKING_URI, else a store beside the runs (<output.dir>/mlflow.db)."""
    overwrite: bool = False
    """Replace an existing run directory of the same name (otherwise an error): only a folder lmtune made (it holds a
    `.lmtune` marker) and that no running process holds; what it holds is removed, nothing outside it."""

    @model_validator(mode="after")
    def _check(self) -> "OutputConfig":
        if self.name is not None and (problem := name_problem(self.name)):
            raise ValueError(f"output.name={shown(self.name)} {problem}")
        return self


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    task: SerializeAsAny[BaseModel]
    method: SerializeAsAny[BaseModel]
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        no_validation = self.data.validation is None and self.data.validation_size == 0
        if no_validation and self.train.early_stopping_patience:
            raise ValueError("train.early_stopping_patience needs validation data: give data.validation "
                             "or a data.validation_size above 0")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
            "output": OutputConfig}
DEFAULT_TASK, DEFAULT_METHOD = "classification", "full"


def _unknown_section(key: str, known: list[str]) -> str:
    """A top-level key that is no section: the section field it names (`lr` -> train.lr), else the nearest section."""
    field = ALIASES.get(key, key)
    owners = [f"{name}.{field}" for name, model in SECTIONS.items() if field in model.model_fields]
    return f"; did you mean {owners[0]!r}?" if len(owners) == 1 else _closest(key, known)


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw nested dict into a RunConfig, raising one ConfigError listing every problem."""
    import lmtune.methods  # noqa: F401  (importing the packages registers the built-in tasks and methods)
    import lmtune.tasks  # noqa: F401

    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a mapping of sections, got {type(raw).__name__}")
    known = set(SECTIONS) | {"task", "method"}
    errors = [f"{_clip(str(key))}: unknown section{_unknown_section(str(key), sorted(known))}" for key in raw
              if key not in known]
    task, task_errors = _validate_registered(raw.get("task"), "task", TASKS, DEFAULT_TASK)
    method, method_errors = _validate_registered(raw.get("method"), "method", METHODS, DEFAULT_METHOD)
    errors += task_errors + method_errors
    rest = {k: v for k, v in raw.items() if k in SECTIONS}
    if not errors:
        try:
            return RunConfig.model_validate({**rest, "task": task, "method": method})
        except ValidationError as err:
            errors += _format_errors(err, (), RunConfig)
    else:  # the task or method is wrong: still check each other section on its own
        for key, value in rest.items():
            try:
                SECTIONS[key].model_validate(value if value is not None else {})
            except ValidationError as err:
                errors += _format_errors(err, (key,), SECTIONS[key])
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(dict.fromkeys(errors)))


def load_config(source: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or take a dict/RunConfig), apply dotted overrides and validate."""
    if isinstance(source, RunConfig):
        raw = source.model_dump(mode="json")
    elif isinstance(source, dict):
        if alias_growth_exceeds(source):
            parts = "its repeated parts (YAML aliases, shared objects)"
            raise ConfigError(f"the config: {_alias_growth_problem(parts)}")
        raw = yaml.safe_load(yaml.safe_dump(source, sort_keys=False))  # deep copy, in order; callers keep their dict
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = read_yaml(path) or {}
    if isinstance(raw, dict) and raw.get("search") is not None:
        # One file may hold a run and its search space; `lmtune search` reads the space, training ignores it.
        logging.getLogger("lmtune").info("config: the search section is read by `lmtune search` only")
    raw = {k: v for k, v in raw.items() if k != "search"} if isinstance(raw, dict) else raw
    return build_config(override(raw, overrides or []))

