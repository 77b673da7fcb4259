"""`lmtune search`: an Optuna search over any config field, each trial a normal run, resumable from SQLite."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lmtune.config import RunConfig, load_config
from lmtune.config_read import override, read_yaml, shown
from lmtune.errors import ConfigError
from lmtune.preflight import metric_problem
from lmtune.folders import claim
from lmtune.rundir import refuse_run_folder
from lmtune.studies.seeds import apply, shared_by_runs
from lmtune.studies.trials import _assignments, _objective, _open_study, _run_trials

log = logging.getLogger("lmtune")


class ParamSpace(BaseModel):
    """One searched field: `{type: float, low: 1.0e-5, high: 1.0e-3, log: true}` or `{type: categorical, choices: [...]}`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    type: Literal["float", "int", "categorical"]
    """float and int sample from [low, high]; categorical picks one of `choices`."""
    low: float | None = None
    """Smallest value (float, int)."""
    high: float | None = None
    """Largest value (float, int), included."""
    log: bool = False
    """Sample on a log scale (learning rates, weight decay)."""
    step: float | None = None
    """Sample on a grid of this spacing (int: default 1)."""
    choices: list[Any] | None = None
    """The values a categorical field takes (numbers, strings, e.g. method names)."""

    @model_validator(mode="after")
    def _check(self) -> "ParamSpace":
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("categorical takes a non-empty `choices` list (and no low/high)")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"{self.type} takes `low` and `high` (and no choices)")
        if self.low > self.high or (self.log and self.low <= 0):
            raise ValueError(f"low={self.low}, high={self.high}: need low <= high (and low > 0 with log: true)")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"int takes whole numbers (got low={self.low}, high={self.high})")
        return self

    def bounds(self) -> list[Any]:
        """The values that must all make a valid config (checked before any trial starts)."""
        if self.type == "categorical":
            return list(self.choices or [])
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def suggest(self, trial: Any, name: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


class SearchConfig(BaseModel):
    """The `search:` section of a config (or of a separate --space file)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    space: dict[str, ParamSpace]
    """Dotted config field -> its range, e.g. `train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}`."""
    metric: str | None = None
    """Validation metric to optimise; default: eval.metric, else the task's main metric."""
    direction: Literal["maximize", "minimize"] | None = None
    """Default: from the task (losses are minimised, everything else maximised)."""
    trials: int = 20
    """Finished trials (complete or pruned) the search ends with, counting those of earlier invocations."""
    timeout_minutes: float | None = None
    """Stop starting new trials after this many minutes (of this invocation)."""
    pruner: Literal["median", "none"] = "median"
    """median: stop a trial whose evaluation is worse than the median of earlier trials at the same evaluation."""
    startup_trials: int = 5
    """Trials that must finish before the pruner stops any."""
    warmup_evals: int = 0
    """Evaluations of a trial before it can be pruned."""
    seed: int | None = None
    """Sampler seed; default: train.seed."""
    heartbeat_seconds: int = 30
    """A running trial writes a heartbeat to the study's database this often."""
    grace_seconds: int = 120
    """A trial whose heartbeat has been silent this long (its process died) is failed and run again by any
    process of the search; at least twice heartbeat_seconds."""

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        if not self.space:
            raise ValueError("search.space is empty: name at least one field to search")
        if self.trials < 1 or self.startup_trials < 0 or self.warmup_evals < 0:
            raise ValueError("search.trials must be at least 1; startup_trials and warmup_evals at least 0")
        if self.heartbeat_seconds < 1 or self.grace_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(f"search.heartbeat_seconds must be at least 1 and grace_seconds at least twice it "
                             f"(got {self.heartbeat_seconds} and {self.grace_seconds}): a live trial whose "
                             f"heartbeat is late would be failed")
        return self


def _search_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = "search." + ".".join(loc)
        if e["type"] == "extra_forbidden":
            fields = ParamSpace.model_fields if loc[0] == "space" else SearchConfig.model_fields
            match = difflib.get_close_matches(loc[-1], list(fields), n=1, cutoff=0.5)
            lines.append(f"{where}: unknown key" + (f"; did you mean {match[0]!r}?" if match else
                                                    f"; valid keys: {', '.join(fields)}"))
        else:
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "invalid search section:\n  - " + "\n  - ".join(lines)


def read_search(config: str | Path, space_file: str | Path | None = None) -> tuple[dict[str, Any], SearchConfig]:
    """The run config without its `search` section, and that section (or the --space file's) validated."""
    def read(path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise ConfigError(f"file not found: {path}")
        data = read_yaml(path) or {}  # an alias bomb is refused there, before anything walks it
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping")
        return data

    raw = read(Path(config))
    section = raw.pop("search", None)
    if space_file is not None:
        spaced = read(Path(space_file))
        section = spaced.get("search", spaced)
    if section is None:
        raise ConfigError(f"{config} has no `search:` section; add one or pass --space FILE")
    try:
        return raw, SearchConfig.model_validate(section)
    except ValidationError as err:
        raise ConfigError(_search_errors(err)) from None


def check_space(raw: dict[str, Any], overrides: list[str], spec: SearchConfig) -> None:
    """Every searched field at each of its bounds (or choices) must make a valid config: fail before trial 1."""
    for key, param in spec.space.items():
        for value in param.bounds():
            try:
                load_config(raw, overrides + _assignments({key: value}))
            except ConfigError as err:
                raise ConfigError(f"search.space.{key} = {shown(value)} does not make a valid config: {err}") from None


@dataclass
class SearchResult:
    folder: Path
    metric: str
    direction: str
    rows: list[dict[str, Any]]            # one per trial: number, state, params, value, seconds ...
    best: dict[str, Any] | None           # the best complete trial's row


def search(config: str | Path, overrides: list[str] | None = None, *, space: str | Path | None = None,
           trials: int | None = None, timeout_minutes: float | None = None, storage: str | None = None,
           output: str | Path | None = None) -> SearchResult:
    """Run (or resume) the search declared in `config` (or `space`); write trials.csv/.md, best.yaml, plots."""
    import optuna
    from optuna.trial import TrialState

    from lmtune.registry import TASKS

    overrides = list(overrides or [])
    raw, spec = read_search(config, space)
    spec = spec.model_copy(update={k: v for k, v in (("trials", trials), ("timeout_minutes", timeout_minutes))
                                   if v is not None})
    base = load_config(raw, overrides)
    check_space(raw, overrides, spec)
    if base.train.seeds:
        raise ConfigError("train.seeds: a search trains one seed per trial; run the seeds on best.yaml afterwards")
    if base.data.validation is None and base.data.validation_size == 0:
        raise ConfigError("a search scores trials on validation data: give data.validation or data.validation_size > 0")
    task = TASKS[base.task.name](base.task, base.data)
    metric = (spec.metric or base.eval.metric or task.default_metric).removeprefix("eval/")
    if problem := metric_problem(metric, task, "search.metric" if spec.metric else "eval.metric"):
        raise ConfigError(problem)  # before any trial: each would fail on it
    direction = spec.direction or ("maximize" if task.greater_is_better(metric) else "minimize")
    stem = Path(config).stem
    folder = Path(output or Path(base.output.dir) / (base.output.name or f"{stem}-search"))
    refuse_run_folder(folder, "search")
    # A search folder is continued, never emptied; several workers may share it (no lock: the study coordinates).
    # With its own database file the folder is this process's alone (locked: a second process would fail its running
    # trial); with --storage, workers may share it and the study coordinates them.
    lock = claim(folder, "search", resume=True, lock=storage is None)
    try:
        url = storage or f"sqlite:///{(folder / 'search.db').resolve()}"
        study = _open_study(stem, url, storage is None, direction, spec,
                            base.train.seed if spec.seed is None else spec.seed)
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        remaining = spec.trials - len(study.get_trials(deepcopy=False, states=finished))
        log.info("search: %s %s over %d fields; %d of %d trials to go; storage %s", direction, metric,
                 len(spec.space), max(remaining, 0), spec.trials, url)
        if remaining > 0:
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # lmtune logs each trial itself
            shared = overrides + _assignments(_pinned_once(study, base))  # (best.yaml keeps the names as given)
            _run_trials(study, lambda t: _objective(t, raw, shared, spec, metric, folder), spec,
                        failures=remaining)
        return write_outputs(study, raw, overrides, spec, metric, folder, Path(config))
    finally:
        if lock is not None:
            lock.release()


def _pinned_once(study: Any, base: RunConfig) -> dict[str, Any]:
    """What every trial shares (Hub names at commits: seeds.shared_by_runs), fixed when the study starts and kept
    with it: a search continued later (or by another worker) stays on the commits its first trials used."""
    from lmtune.rundir import keep_pins

    started = study.user_attrs.get("started_with")
    if started is not None:
        base = keep_pins(base, load_config(apply(base.model_dump(mode="json"), started)))
    shared = shared_by_runs(base)
    if started is None:
        study.set_user_attr("started_with", shared)
    return shared


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name.lower(), **t.params, "value": t.value,
                     "last_reported": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values
                     else None, "evaluations": len(t.intermediate_values), "seconds": t.user_attrs.get("seconds"),
                     "cuda_memory_mb": t.user_attrs.get("cuda_memory_mb"), "run_dir": t.user_attrs.get("run_dir")})
    return rows


def write_outputs(study: Any, raw: dict, overrides: list[str], spec: SearchConfig, metric: str, folder: Path,
                  config: Path) -> SearchResult:
    from lmtune.evaluation.report import write_report
    from lmtune.studies.report import plot_history, plot_importances, write_tables
    from lmtune.files import write_text

    rows = trial_rows(study)
    direction = study.direction.name.lower()
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = (max if direction == "maximize" else min)(complete, key=lambda r: r["value"]) if complete else None
    write_tables(rows, list(spec.space), folder, metric)
    if best is not None:
        params = {key: best[key] for key in spec.space if key in best}
        tuned = override(yaml.safe_load(yaml.safe_dump(raw, sort_keys=False)), overrides + _assignments(params))
        if name := (tuned.get("output") or {}).get("name"):  # that name is the search's folder: the run needs its own
            tuned["output"]["name"] = f"{name}-best"
        header = (f"# best of {len(rows)} trials of {config.name} (trial {best['number']}: validation {metric} "
                  f"{best['value']:.4g}); train it with `lmtune train {folder / 'best.yaml'}`\n")
        write_text(folder / "best.yaml", header + yaml.safe_dump(tuned, sort_keys=False))
        load_config(folder / "best.yaml")  # what we hand out must load
    plot_history(rows, folder / "plots" / "history.png", metric, direction)
    plot_importances(study, folder / "plots" / "importances.png")
    write_report(folder)
    return SearchResult(folder, metric, direction, rows, best)
