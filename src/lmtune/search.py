"""`lmtune search`: an Optuna search over any config field, each trial a normal run, resumable from SQLite."""

from __future__ import annotations

import difflib
import gc
import json
import logging
import random
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lmtune.compare import refuse_run_folder
from lmtune.config import ConfigError, load_config, override, read_yaml, shown
from lmtune.preflight import metric_problem
from lmtune.rundir import claim

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


def _assignments(params: dict[str, Any]) -> list[str]:
    # JSON is YAML: strings keep their quotes, numbers and booleans parse back to themselves.
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


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


class _PruneCallback:
    """Reports each evaluation to Optuna (indexed by evaluation number, so trials with different batch sizes
    compare at the same epoch or eval) and stops the run when the pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric, self.seen = trial, metric, 0

    def __call__(self, state: Any) -> None:
        import optuna

        if state.evals == self.seen or self.metric not in state.last_eval:
            return
        self.seen = state.evals
        value = float(state.last_eval[self.metric])
        self.trial.report(value, state.evals)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at", {"evaluation": state.evals, "step": state.step, "value": value})
            raise optuna.TrialPruned(f"evaluation {state.evals} (step {state.step}): {self.metric} {value:.4g}")


def _release_memory(trial: Any) -> None:
    import torch

    gc.collect()  # models, optimizers and accelerator of the finished trial sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        trial.set_user_attr("cuda_memory_mb", round(torch.cuda.memory_allocated() / 2**20, 1))


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search. The trial it stopped (`trial`) is failed, its checkpoints removed and its parameters
    queued again, so running the same search again redoes it."""

    def __init__(self, trial: int) -> None:
        super().__init__(f"search interrupted: trial {trial} will run again when you re-run this command")
        self.trial = trial


class _Stop(BaseException):
    """Leaves Optuna's trial loop without Optuna ending the trial (for a Ctrl-C it would fail the trial and log the
    traceback): the search decides what becomes of it. Not an Exception, so Optuna's handler lets it through."""

    def __init__(self, trial: Any, surplus: bool = False) -> None:
        super().__init__(trial.number)
        self.number, self.trial_id, self.surplus = trial.number, trial._trial_id, surplus


def _objective(trial: Any, raw: dict, overrides: list[str], spec: SearchConfig, metric: str, folder: Path) -> float:
    import shutil

    from optuna.trial import TrialState

    # Processes sharing a search may start trials at the same moment, each having counted one slot left: the
    # trial with the lowest number takes it, the others are handed back (and their processes wait).
    taken = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    if sum(t.state != TrialState.RUNNING or t.number < trial.number for t in taken) >= spec.trials:
        raise _Stop(trial, surplus=True)
    run_dir = folder / "trials" / str(trial.number)
    try:
        return _train_trial(trial, raw, overrides, spec, metric, run_dir)
    except KeyboardInterrupt as err:
        traceback.clear_frames(err.__traceback__)  # the run's frames hold its model and optimizer
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the trial is redone from its start
        raise _Stop(trial) from None


def _train_trial(trial: Any, raw: dict, overrides: list[str], spec: SearchConfig, metric: str,
                 run_dir: Path) -> float:
    import shutil

    import optuna

    from lmtune.run import train
    from lmtune.training.checkpoint import write_text

    params = {key: param.suggest(trial, key) for key, param in spec.space.items()}
    trial.set_user_attr("run_dir", str(run_dir))
    log.info("search: trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
    started = time.perf_counter()
    run = _assignments({**params, "eval.metric": metric, "output.dir": str(run_dir.parent),
                        "output.name": str(trial.number), "output.overwrite": True})
    value = pruned = None
    try:
        result = train(raw, overrides + run, callbacks=[_PruneCallback(trial, metric)])
        value = float(result.metrics["validation"][metric])
        del result
    except optuna.TrialPruned as err:
        pruned = str(err)
        traceback.clear_frames(err.__traceback__)  # the run's frames hold its model and optimizer
        # The run directory keeps its config and metrics.jsonl; pruned.json says why it stopped, and the
        # checkpoints (only good for resuming a run nobody will resume) go.
        write_text(run_dir / "pruned.json", json.dumps({"trial": trial.number, "reason": pruned,
                                                         **trial.user_attrs.get("pruned_at", {})}, indent=2))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        log.info("search: trial %d pruned at %s", trial.number, pruned)
    finally:
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
    # Outside the except block: no live traceback keeps the pruned run's memory (measured on a GPU: a pruned
    # trial raised from inside the handler left its model allocated until the next trial).
    _release_memory(trial)
    if pruned is not None:
        raise optuna.TrialPruned(pruned)
    return value


def _run_trials(study: Any, objective: Any, spec: SearchConfig, failures: int) -> None:
    """Run trials until `spec.trials` are finished (complete or pruned) in the study, by this process or others,
    the time budget is spent, or `failures` trials of this process have failed. While the last trials run in other
    processes, wait for them: one whose process dies is failed once its heartbeat has been silent for the grace
    period, its parameters are queued again, and this process runs them."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
    from optuna.trial import TrialState

    deadline = time.monotonic() + spec.timeout_minutes * 60 if spec.timeout_minutes else float("inf")
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    ended: list[Any] = []
    waited_for = None
    while failures > 0 and time.monotonic() < deadline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)  # as Optuna does before each trial; a waiting process must do it too
        trials = study.get_trials(deepcopy=False, states=(*finished, TrialState.RUNNING))
        done = sum(t.state in finished for t in trials)
        running = [t.number for t in trials if t.state == TrialState.RUNNING]
        if done >= spec.trials:
            return
        if done + len(running) >= spec.trials:
            if running != waited_for:
                log.info("search: %d of %d trials finished; waiting for trial %s, running elsewhere (redone here "
                         "if its heartbeat stops for %d s)", done, spec.trials, ", ".join(map(str, running)),
                         spec.grace_seconds)
                waited_for = running
            time.sleep(max(0.0, min(spec.heartbeat_seconds, 10, deadline - time.monotonic())))
            continue
        try:
            study.optimize(objective, n_trials=1, catch=(ConfigError,), callbacks=[lambda _, t: ended.append(t)])
        except _Stop as stop:
            if stop.surplus:  # untouched: back in the queue (parameters fixed for it, if any, stay)
                study._storage.set_trial_state_values(stop.trial_id, TrialState.WAITING)
                continue
            frozen = study.tell(stop.number, state=TrialState.FAIL, skip_if_finished=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # Queued again as a heartbeat-stale trial is (same record of which trial it redoes), but every
                # time: a Ctrl-C says nothing against the trial.
                RetryHeartbeatStaleTrialCallback(max_retry=None)(study, frozen)
            raise SearchInterrupted(stop.number) from None
        failures -= sum(t.state == TrialState.FAIL for t in ended)
        ended.clear()


def _open_study(name: str, url: str, local: bool, direction: str, spec: SearchConfig, seed: int) -> Any:
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    # A trial whose process died (kill -9, a lost machine) stays RUNNING in the database. With the heartbeat, any
    # process of the search marks such a trial FAIL once it has been silent for `grace_seconds`, and the retry
    # callback enqueues its parameters again (once): the trial is redone, never counted as finished. (A Ctrl-C
    # queues its trial again at once: `_run_trials`.)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_evals) \
        if spec.pruner == "median" else optuna.pruners.NopPruner()
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna, and exactly what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
                storage = RDBStorage(url, heartbeat_interval=spec.heartbeat_seconds, grace_period=spec.grace_seconds,
                                     heartbeat_stale_trial_callback=retry, engine_kwargs={"connect_args": {
                                         "timeout": 60}} if url.startswith("sqlite") else None)
            study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction=direction,
                                        pruner=pruner)
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Processes starting together on an empty database all create Optuna's tables; the losers fail on
            # "already exists" (optuna#1092) and find them there the next time.
            if attempt == 4:
                raise
            log.info("search: another process is creating the study's tables in %s; trying again", url)
            time.sleep(0.5 + random.random())
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} in {url} was created to {study.direction.name.lower()}; "
                          f"this search asks to {direction}")
    if local:  # our own database file: nobody else runs its trials, so a RUNNING one died with its process
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.info("search: trial %d was interrupted; it is marked failed and its parameters run again",
                     frozen.number)
            storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
            retry(study, storage.get_trial(frozen._trial_id))
    # Seeded by how far the search got, so a resumed search does not replay the first trials' samples. Processes
    # sharing a search (whose order of trials is timing's anyway) take fresh seeds: started together, they would
    # otherwise sample the same parameters.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials) if local else None)
    return study


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
    claim(folder, "search", resume=True, lock=False)
    url = storage or f"sqlite:///{(folder / 'search.db').resolve()}"
    study = _open_study(stem, url, storage is None, direction, spec,
                        base.train.seed if spec.seed is None else spec.seed)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = spec.trials - len(study.get_trials(deepcopy=False, states=finished))
    log.info("search: %s %s over %d fields; %d of %d trials to go; storage %s", direction, metric, len(spec.space),
             max(remaining, 0), spec.trials, url)
    if remaining > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # lmtune logs each trial itself
        _run_trials(study, lambda t: _objective(t, raw, overrides, spec, metric, folder), spec, failures=remaining)
    return write_outputs(study, raw, overrides, spec, metric, folder, Path(config))


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
    from lmtune.search_report import plot_history, plot_importances, write_tables
    from lmtune.training.checkpoint import write_text

    rows = trial_rows(study)
    direction = study.direction.name.lower()
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = (max if direction == "maximize" else min)(complete, key=lambda r: r["value"]) if complete else None
    write_tables(rows, list(spec.space), folder, metric)
    if best is not None:
        params = {key: best[key] for key in spec.space if key in best}
        tuned = override(yaml.safe_load(yaml.safe_dump(raw)), overrides + _assignments(params))
        if name := (tuned.get("output") or {}).get("name"):  # that name is the search's folder: the run needs its own
            tuned["output"]["name"] = f"{name}-best"
        header = (f"# best of {len(rows)} trials of {config.name} (trial {best['number']}: validation {metric} "
                  f"{best['value']:.4g}); train it with `lmtune train {folder / 'best.yaml'}`\n")
        write_text(folder / "best.yaml", header + yaml.safe_dump(tuned, sort_keys=False))
        load_config(folder / "best.yaml")  # what we hand out must load
    plot_history(rows, folder / "plots" / "history.png", metric, direction)
    plot_importances(study, folder / "plots" / "importances.png")
    return SearchResult(folder, metric, direction, rows, best)
