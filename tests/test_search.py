"""`lmtune search`: a tiny Optuna search that prunes, resumes after an interruption and writes the best config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmtune.cli import app
from lmtune.config import ConfigError, load_config
from lmtune.search import read_search, search

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
    from lmtune import search as search_module

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


def test_a_metric_the_task_lacks_fails_before_any_trial(tiny_config, tmp_path) -> None:
    config = write_config(tiny_config, tmp_path, metric="f1")
    with pytest.raises(ConfigError, match=r"search.metric 'f1' is not a metric of the classification task "
                                          r"\(its metrics: accuracy, macro_f1, loss\)"):
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

    from lmtune.search_report import plot_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 0, 1) + 0 * t.suggest_float("noise", 0, 1), n_trials=12)
    assert plot_importances(study, tmp_path / "a.png") == tmp_path / "a.png" and (tmp_path / "a.png").is_file()
    flat = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    flat.optimize(lambda t: 0.5 + 0 * t.suggest_float("lr", 0, 1) + 0 * t.suggest_float("x", 0, 1), n_trials=6)
    assert plot_importances(flat, tmp_path / "b.png") is None  # no variance to share out (PED-ANOVA split it 50/50)
