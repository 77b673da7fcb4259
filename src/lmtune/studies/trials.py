"""Running a search's trials on its Optuna study: each trial a training run, pruned, failed or interrupted; heartbeats
so that several processes (and machines) share one study and a dead one's trial is redone."""

from __future__ import annotations

import gc
import json
import logging
import random
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtune.errors import ConfigError, DivergedError

if TYPE_CHECKING:
    from lmtune.studies.search import SearchConfig

log = logging.getLogger("lmtune")


def _assignments(params: dict[str, Any]) -> list[str]:
    # JSON is YAML: strings keep their quotes, numbers and booleans parse back to themselves.
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


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
    from lmtune.files import write_text

    params = {key: param.suggest(trial, key) for key, param in spec.space.items()}
    trial.set_user_attr("run_dir", str(run_dir))
    log.info("search: trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
    started = time.perf_counter()
    run = _assignments({**params, "eval.metric": metric, "output.dir": str(run_dir.parent),
                        "output.name": str(trial.number), "output.overwrite": True})
    value = pruned = diverged = None
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
    except DivergedError as err:  # parameters that make training diverge: this trial fails, the search goes on
        diverged = str(err)
        traceback.clear_frames(err.__traceback__)
        trial.set_user_attr("diverged", diverged)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        log.warning("search: trial %d failed: %s", trial.number, diverged)
    finally:
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
    # Outside the except block: no live traceback keeps the pruned run's memory (measured on a GPU: a pruned
    # trial raised from inside the handler left its model allocated until the next trial).
    _release_memory(trial)
    if pruned is not None:
        raise optuna.TrialPruned(pruned)
    if diverged is not None:
        raise DivergedError(diverged)
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
    adopted: set[int] = set()
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
            _beat_once_for_orphans(study, trials, spec, adopted)
            if running != waited_for:
                log.info("search: %d of %d trials finished; waiting for trial %s, running elsewhere (redone here "
                         "if its heartbeat stops for %d s)", done, spec.trials, ", ".join(map(str, running)),
                         spec.grace_seconds)
                waited_for = running
            time.sleep(max(0.0, min(spec.heartbeat_seconds, 10, deadline - time.monotonic())))
            continue
        try:
            study.optimize(objective, n_trials=1, catch=(ConfigError, DivergedError),
                           callbacks=[lambda _, t: ended.append(t)])
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


def _beat_once_for_orphans(study: Any, trials: list[Any], spec: SearchConfig, adopted: set[int]) -> None:
    """A trial left RUNNING without a heartbeat (its process died before its first one) would be waited for forever:
    once it is older than the grace period, one heartbeat is recorded for it, so that it goes stale and is redone
    like any other. A live trial's own process keeps beating: one more beat changes nothing for it."""
    from datetime import datetime, timedelta

    from optuna.trial import TrialState

    old = datetime.now() - timedelta(seconds=spec.grace_seconds)
    for t in trials:
        if t.state == TrialState.RUNNING and t._trial_id not in adopted and t.datetime_start and t.datetime_start < old:
            adopted.add(t._trial_id)
            study._storage.record_heartbeat(t._trial_id)


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
