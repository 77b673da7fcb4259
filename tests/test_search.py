"""`lmtune search`: a tiny Optuna search that prunes, resumes after an interruption and writes the best config."""

from __future__ import annotations

import csv
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmtune.cli import app
from lmtune.config import ConfigError, load_config
from lmtune.studies.search import read_search, search

SPACE = {"metric": "accuracy", "trials": 2, "pruner": "median", "startup_trials": 1, "seed": 0,
         "space": {"train.lr": {"type": "float", "low": 1e-8, "high": 5e-3, "log": True},
                   "train.schedule": {"type": "categorical", "choices": ["linear", "constant"]}}}


def write_config(tiny_config: dict, tmp_path, **search) -> str:
    tiny_config["train"].update(epochs=3, checkpoint=True)
    path = tmp_path / "sst.yaml"
    path.write_text(yaml.safe_dump({**tiny_config, "search": {**SPACE, **search}}))
    return str(path)


def _count_live_models(monkeypatch) -> list[int]:
    """After each trial's memory release: how many models built by the search so far are still alive."""
    import gc
    import weakref

    from lmtune import models
    from lmtune.studies import trials as search_module

    refs, alive = [], []
    load_model, release = models.load_model, search_module._release_memory

    def tracked_load(*args, **kwargs):
        model, new = load_model(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model, new

    def counted_release(trial):
        release(trial)
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))

    monkeypatch.setattr(models, "load_model", tracked_load)
    monkeypatch.setattr(search_module, "_release_memory", counted_release)
    return alive


def test_search_prunes_resumes_and_writes_the_best_config(tiny_config, tmp_path, monkeypatch) -> None:
    import optuna

    alive = _count_live_models(monkeypatch)
    config = write_config(tiny_config, tmp_path)
    folder = tmp_path / "search"
    storage = f"sqlite:///{folder / 'search.db'}"
    folder.mkdir()
    # The first trial learns (lr 5e-3), the second cannot (lr 1e-8): after one finished trial the median
    # pruner stops it at the first evaluation where its accuracy is below the first trial's.
    study = optuna.create_study(study_name="sst", storage=storage, direction="maximize")
    study.enqueue_trial({"train.lr": 5e-3, "train.schedule": "constant"})
    study.enqueue_trial({"train.lr": 1e-8, "train.schedule": "constant"})
    result = search(config, output=folder)
    assert [(r["number"], r["state"]) for r in result.rows] == [(0, "complete"), (1, "pruned")]
    assert alive == [0, 0]  # a finished and a pruned trial both let go of their model
    assert (folder / "search.db").is_file()
    pruned = json.loads((folder / "trials" / "1" / "pruned.json").read_text())
    assert pruned["evaluation"] < 3  # stopped before its last (third) evaluation
    assert not (folder / "trials" / "1" / "checkpoints").exists()
    assert (folder / "trials" / "0" / "metrics.json").is_file()
    first_run = (folder / "trials" / "0" / "metrics.json").stat().st_mtime_ns

    # Interrupted mid-trial: a trial left RUNNING (its process died) must not count as finished.
    optuna.load_study(study_name="sst", storage=storage).ask()
    result = search(config, ["train.epochs=2"], trials=3, output=folder)  # overrides apply to new trials
    states = {r["number"]: r["state"] for r in result.rows}
    assert states[0] == "complete" and states[1] == "pruned" and states[2] == "fail"
    assert sum(s in ("complete", "pruned") for s in states.values()) == 3 and len(states) == 4
    assert (folder / "trials" / "0" / "metrics.json").stat().st_mtime_ns == first_run  # not redone
    assert load_config(folder / "trials" / "3" / "config.yaml").train.epochs == 2

    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "pruned", "fail", rows[3]["state"]]
    assert "| 1 | pruned |" in (folder / "trials.md").read_text()
    best = load_config(folder / "best.yaml")
    assert result.best is not None and best.train.lr == pytest.approx(result.best["train.lr"])
    assert "search" not in yaml.safe_load((folder / "best.yaml").read_text())
    assert (folder / "plots" / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_search_cli_and_best_yaml_trains(tiny_config, tmp_path) -> None:
    tiny_config["train"]["epochs"] = 1
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"search": {"trials": 2, "pruner": "none", "space": {
        "train.lr": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True},
        "method.name": {"type": "categorical", "choices": ["full", "bitfit"]}}}}))
    out = Path(tiny_config["output"]["dir"]) / "tuned"  # output.name names the search folder
    result = CliRunner().invoke(app, ["search", str(config), "--space", str(space), "output.name=tuned"])
    assert result.exit_code == 0, result.output
    assert "best" in result.output and (out / "trials.csv").is_file()
    result = CliRunner().invoke(app, ["train", str(out / "best.yaml")])
    assert result.exit_code == 0, result.output
    # best.yaml's run gets its own folder next to the search's, not the search's own (which it would replace)
    assert (out.parent / "tuned-best" / "metrics.json").is_file() and (out / "search.db").is_file()


def test_unknown_space_key_fails_before_any_trial(tiny_config, tmp_path) -> None:
    config = write_config(tiny_config, tmp_path, space={"train.lrr": {"type": "float", "low": 1e-5, "high": 1e-3}})
    with pytest.raises(ConfigError, match="train.lrr: unknown key; did you mean 'lr'"):
        search(config, output=tmp_path / "s")
    assert not (tmp_path / "s").exists()
    bad = write_config(tiny_config, tmp_path, space={"train.lr": {"type": "float", "low": 1e-5}}, trails=3)
    with pytest.raises(ConfigError) as info:
        read_search(bad)
    assert "search.trails: unknown key; did you mean 'trials'" in str(info.value)
    assert "float takes `low` and `high`" in str(info.value)
    with pytest.raises(ConfigError, match="grace_seconds at least twice it"):  # a late heartbeat must not fail a trial
        read_search(write_config(tiny_config, tmp_path, heartbeat_seconds=10, grace_seconds=15))


def test_a_metric_the_task_lacks_fails_before_any_trial(tiny_config, tmp_path) -> None:
    config = write_config(tiny_config, tmp_path, metric="f1")
    with pytest.raises(ConfigError, match=r"search.metric 'f1' is not a metric of the classification task "
                                          r"\(its metrics: accuracy, macro_f1, ece, brier, loss\)"):
        search(config, output=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_search_refuses_a_training_runs_folder(tiny_config, tmp_path) -> None:
    config = write_config(tiny_config, tmp_path)
    run = Path(tiny_config["output"]["dir"]) / "done"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a training run"):
        search(config, ["output.name=done"])
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json"]


def test_importances_are_fanova_shares_and_a_flat_study_gets_none(tmp_path) -> None:
    import optuna

    from lmtune.studies.report import plot_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 0, 1) + 0 * t.suggest_float("noise", 0, 1), n_trials=12)
    assert plot_importances(study, tmp_path / "a.png") == tmp_path / "a.png" and (tmp_path / "a.png").is_file()
    flat = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    flat.optimize(lambda t: 0.5 + 0 * t.suggest_float("lr", 0, 1) + 0 * t.suggest_float("x", 0, 1), n_trials=6)
    assert plot_importances(flat, tmp_path / "b.png") is None  # no variance to share out (PED-ANOVA split it 50/50)


def test_ctrl_c_in_a_trial_exits_130_and_the_next_search_redoes_it(tiny_config, tmp_path, monkeypatch) -> None:
    import optuna

    from lmtune.studies import trials as search_module

    config = write_config(tiny_config, tmp_path, trials=1, pruner="none")
    folder = tmp_path / "search"
    prune_check = search_module._PruneCallback.__call__

    def ctrl_c_after_the_first_checkpoint(self, state) -> None:  # as a Ctrl-C lands: deep inside training
        prune_check(self, state)
        if (Path(self.trial.user_attrs["run_dir"]) / "checkpoints").is_dir():
            raise KeyboardInterrupt

    monkeypatch.setattr(search_module._PruneCallback, "__call__", ctrl_c_after_the_first_checkpoint)
    result = CliRunner().invoke(app, ["search", config, "--output", str(folder)])
    assert result.exit_code == 130, result.output
    assert "search interrupted: trial 0 will run again when you re-run this command" in result.output
    assert "Traceback" not in result.output and "KeyboardInterrupt" not in result.output
    assert (folder / "trials" / "0" / "config.yaml").is_file()
    assert not (folder / "trials" / "0" / "checkpoints").exists()
    interrupted, queued = optuna.load_study(study_name="sst", storage=f"sqlite:///{folder / 'search.db'}").trials
    assert interrupted.state.name == "FAIL" and queued.state.name == "WAITING"
    assert queued.params == interrupted.params and queued.system_attrs["failed_trial"] == 0

    monkeypatch.setattr(search_module._PruneCallback, "__call__", prune_check)
    result = search(config, output=folder)  # the same search again: trial 0's parameters run, the count is reached
    assert [(r["number"], r["state"]) for r in result.rows] == [(0, "fail"), (1, "complete")]
    assert result.rows[1]["train.lr"] == interrupted.params["train.lr"]
    assert (folder / "trials" / "1" / "metrics.json").is_file()
    assert issubclass(search_module.SearchInterrupted, KeyboardInterrupt)  # Python callers see a Ctrl-C as ever


def test_a_trial_started_past_the_count_at_the_same_moment_as_anothers_is_handed_back(tmp_path, monkeypatch) -> None:
    import threading

    import optuna

    from lmtune.studies import trials as search_module
    from lmtune.studies.search import SearchConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    other = optuna.load_study(study_name="s", storage=url)  # another process of the search
    spec = SearchConfig.model_validate({**SPACE, "trials": 1, "timeout_minutes": 1, "heartbeat_seconds": 1,
                                        "grace_seconds": 2})
    ask, theirs = study.ask, []

    def ask_just_after_the_other_process() -> optuna.Trial:
        if not theirs:  # both counted 0 of 1 trials finished and none running; the other asked first
            theirs.append(other.ask())
            threading.Timer(1.5, lambda: other.tell(theirs[0], 0.5)).start()  # and finishes it a little later
        return ask()

    monkeypatch.setattr(study, "ask", ask_just_after_the_other_process)
    monkeypatch.setattr("lmtune.run.train", lambda *a, **k: pytest.fail("a surplus trial must not train"))
    started = time.monotonic()
    search_module._run_trials(study, lambda t: search_module._objective(t, {}, [], spec, "accuracy", tmp_path),
                              spec, failures=1)
    assert time.monotonic() - started >= 1.4  # it waited for the other's trial to finish, rather than train
    assert [(t.number, t.state.name, t.params) for t in study.trials] == [(0, "COMPLETE", {}), (1, "WAITING", {})]


def _postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: initdb on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = [Path(p).resolve().parent for p in [shutil.which("initdb")] if p]
    found += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")), reverse=True,
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return next((d for d in found if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own in a temporary folder, reached through a Unix socket there (no TCP port);
    stopped and removed at the end, whatever happened. Skipped without the server programs, except under CI."""
    import pwd

    def unavailable(why: str):
        if os.environ.get("CI"):  # .ci/run installs the server: in CI this test must run
            pytest.fail(why)
        pytest.skip(why)

    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        unavailable("psycopg is not installed (pip install -e '.[dev]')")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        unavailable("PostgreSQL's server programs (initdb, pg_ctl) not found; Debian: apt-get install postgresql")
    as_postgres, owner = (lambda cmd: cmd), None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root: run them as the postgres user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user to run the PostgreSQL server as")
        if shutil.which("runuser"):
            as_postgres = lambda cmd: ["runuser", "-u", "postgres", "--", *cmd]  # noqa: E731
        else:
            as_postgres = lambda cmd: ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]  # noqa: E731
    # Not under pytest's tmp_path: its parent folders are the user's alone, closed to the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="lmtune-pg-", dir="/tmp" if owner else None))
    if owner:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", 5432  # the port only names the socket file in `folder`
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]

    def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(as_postgres(cmd), capture_output=True, text=True, timeout=60)
        assert not check or done.returncode == 0, f"{shlex.join(cmd)}: {done.stdout}{done.stderr}"
        return done

    try:
        run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
        started = run([*pg_ctl, "-l", str(folder / "server.log"), "-w", "-t", "30", "-o",
                       f"-c listen_addresses='' -k {folder} -p {port} -c fsync=off", "start"], check=False)
        assert started.returncode == 0, started.stdout + started.stderr + (
            (folder / "server.log").read_text(errors="replace") if (folder / "server.log").exists() else "")
        yield f"postgresql+psycopg://postgres@/postgres?host={folder}&port={port}"
    finally:
        if (data / "postmaster.pid").exists():
            stopped = run([*pg_ctl, "-m", "immediate", "-w", "-t", "30", "stop"], check=False)
            if stopped.returncode != 0 and (data / "postmaster.pid").exists():
                os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def _start_worker(config: str, storage: str, output: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "COLUMNS": "160"}
    output.mkdir(parents=True)
    log = (output.parent / f"{output.name}.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "lmtune.cli", "search", config, "--storage", storage,
                             "--output", str(output)], stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
def test_two_processes_share_a_postgresql_search_and_redo_a_killed_ones_trial(tiny_config, tmp_path,
                                                                              postgres_url) -> None:
    import optuna

    tiny_config["train"].update(epochs=1, checkpoint=False)
    config = tmp_path / "sst.yaml"
    config.write_text(yaml.safe_dump({**tiny_config, "search": {
        **SPACE, "trials": 2, "pruner": "none", "heartbeat_seconds": 1, "grace_seconds": 5}}))
    a_dir, b_dir = tmp_path / "worker-a", tmp_path / "worker-b"
    a, b = _start_worker(str(config), postgres_url, a_dir), _start_worker(str(config), postgres_url, b_dir)
    try:
        # A is killed (kill -9: no chance to clean up) as soon as it has started a trial (its parameters drawn).
        deadline, study, killed = time.monotonic() + 60, None, None
        while killed is None:
            assert a.poll() is None and time.monotonic() < deadline, (a_dir.parent / "worker-a.log").read_text()
            time.sleep(0.2)
            try:
                study = study or optuna.load_study(study_name="sst", storage=postgres_url)
            except KeyError:  # not created yet
                continue
            killed = next((t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                           if t.user_attrs.get("run_dir", "").startswith(str(a_dir))), None)
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        assert study.trials[killed].state.name == "RUNNING"  # left so by its dead process
        # B finishes the search: after A's trial's heartbeat has been silent for 5 s it fails it and redoes it.
        assert b.wait(90) == 0, (b_dir.parent / "worker-b.log").read_text()
    finally:
        for worker in (a, b):
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
    trials = optuna.load_study(study_name="sst", storage=postgres_url).trials
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(numbers)))  # no number twice, none skipped
    states = {t.number: t.state.name for t in trials}
    assert states[killed] == "FAIL" and sum(s == "COMPLETE" for s in states.values()) == 2, states
    assert set(states.values()) == {"COMPLETE", "FAIL"}, states
    redo = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(redo) == 1 and redo[0].state.name == "COMPLETE" and redo[0].params == trials[killed].params
    assert Path(redo[0].user_attrs["run_dir"]).parent.parent == b_dir  # run by the surviving process
    log = (b_dir.parent / "worker-b.log").read_text()
    assert "Traceback" not in log and (b_dir / "trials.csv").is_file()


def test_a_diverging_trial_fails_and_the_search_goes_on(tiny_config, tmp_path, monkeypatch) -> None:
    from lmtune.errors import DivergedError
    from lmtune.run import RunResult

    calls = []

    def fake_train(raw, overrides, callbacks=None):
        calls.append(overrides)
        if len(calls) == 1:
            raise DivergedError("training diverged at step 3: the validation loss is not finite")
        return RunResult(tmp_path, {"validation": {"accuracy": 0.5 + len(calls) / 10}})

    monkeypatch.setattr("lmtune.run.train", fake_train)
    result = search(write_config(tiny_config, tmp_path), output=tmp_path / "s")
    assert [r["state"] for r in result.rows] == ["fail", "complete", "complete"]  # two finished, as asked
    assert result.best is not None and (tmp_path / "s" / "best.yaml").is_file()


def test_a_search_with_its_own_database_locks_its_folder(tiny_config, tmp_path) -> None:
    from lmtune.errors import FolderError
    from lmtune.folders import FolderLock

    folder = tmp_path / "s"
    folder.mkdir()
    lock = FolderLock(folder)  # another `lmtune search` on the same folder and its own search.db
    try:
        with pytest.raises(FolderError, match="in use by another lmtune process"):
            search(write_config(tiny_config, tmp_path), output=folder)
    finally:
        lock.release()


def test_a_trial_left_running_without_a_heartbeat_is_redone(tiny_config, tmp_path, monkeypatch) -> None:
    import optuna

    from lmtune.run import RunResult

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="sst", storage=url, direction="maximize")
    study._storage.create_new_trial(study._study_id)  # its process died inside ask(): RUNNING, no heartbeat
    time.sleep(2.2)  # older than the grace period
    monkeypatch.setattr("lmtune.run.train", lambda *a, **k: RunResult(tmp_path, {"validation": {"accuracy": 0.5}}))
    config = write_config(tiny_config, tmp_path, trials=1, heartbeat_seconds=1, grace_seconds=2, timeout_minutes=1)
    started = time.monotonic()
    result = search(config, output=tmp_path / "s", storage=url)
    assert time.monotonic() - started < 30  # not waiting on it for the whole time budget
    assert [r["state"] for r in result.rows] == ["fail", "complete"]
