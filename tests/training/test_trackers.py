"""Experiment trackers: MLflow with a local store and W&B offline get the config, every logged metric with its step,
the final metrics and the run's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmtune
from lmtune.config import ConfigError


def test_mlflow_gets_params_metric_histories_and_artifacts(tiny_config: dict, tmp_path: Path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # nothing may land in the working directory (MLflow's default artifact root)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny_config["output"].update(report_to=["mlflow"], mlflow_uri=uri)
    result = lmtune.train(tiny_config)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("runs")  # grouped by the folder that holds the run
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.005" and run.data.params["method.name"] == "full"
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["train/loss"]) for r in logged if "train/loss" in r]
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train.loss")]
    assert [s for s, _ in sorted(history)] == [s for s, _ in losses]  # every logged value at its step
    assert [v for _, v in sorted(history)] == pytest.approx([v for _, v in losses])
    assert run.data.metrics["final.test.accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    files = {f.path for f in client.list_artifacts(run.info.run_id)} | \
        {f.path for d in ("model", "plots") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"config.yaml", "metrics.json", "mistakes.json", "report.html", "model/README.md",
            "plots/learning_curves.png"} <= files
    assert list(work.iterdir()) == [] and (tmp_path / "mlartifacts" / "runs").is_dir()  # beside the store


def test_wandb_offline_keeps_the_metrics_in_the_run_folder(tiny_config: dict, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_config["output"]["report_to"] = ["wandb"]
    tiny_config["train"]["max_steps"] = 4
    result = lmtune.train(tiny_config)
    (offline,) = (result.run_dir / "wandb").glob("offline-run-*")  # inside the run's own folder
    (records,) = offline.glob("run-*.wandb")  # W&B's record log, synced later with `wandb sync`
    data = records.read_bytes()
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert data.count(b"train/loss") >= sum("train/loss" in r for r in logged)  # a history row per logged step
    assert b"final/test/accuracy" in data and b"train.lr" in data  # the final metrics, the config
    assert (offline / "files" / "metrics.json").is_file() and (offline / "files" / "model" / "README.md").is_file()


def test_a_tracker_whose_package_is_missing_is_named_with_its_extra(tiny_config: dict, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import importlib.util

    import yaml
    from typer.testing import CliRunner

    from lmtune.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    tiny_config["output"]["report_to"] = ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"pip install 'lmtune\[wandb\]'"):
        lmtune.train(tiny_config)
    assert not (Path(tiny_config["output"]["dir"]) / "tiny").exists()  # refused before the run folder was made
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 1 and "pip install 'lmtune[wandb]'" in result.output  # validate says so too


class Interrupt(Exception):
    pass


def _crash_at(step: int):
    def crash(state) -> None:
        if state.step == step:
            raise Interrupt
    return crash


def test_a_resumed_run_goes_on_in_the_tracker_runs_it_started(tiny_config: dict, tmp_path: Path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny_config["output"].update(report_to=["mlflow", "wandb", "tensorboard"], mlflow_uri=uri)
    tiny_config["train"].update(eval_every=3, epochs=2, log_every=1)
    with pytest.raises(Interrupt):
        lmtune.train(tiny_config, callbacks=[_crash_at(5)])  # steps 4 and 5 logged, then replayed from step 3
    run_dir = Path(tiny_config["output"]["dir"]) / "tiny"
    ids = json.loads((run_dir / "trackers.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "FAILED"
    result = lmtune.train(tiny_config, resume=True)
    (run,) = client.search_runs([client.get_experiment_by_name("runs").experiment_id])
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"  # the same run, finished
    history = [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")]
    assert max(history) == result.metrics["steps"] and min(history) < 4  # before and after the resume, in one run
    assert sorted(history) == sorted(set(history))  # the replayed steps once each
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    board = [e.step for e in events.Scalars("train/loss")]
    assert sorted(board) == sorted(set(board)) and max(board) == result.metrics["steps"]
    assert events.Scalars("final/test/accuracy")[-1].value == pytest.approx(result.metrics["test"]["accuracy"])
    assert run.data.metrics["final.test.accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"] == ids["wandb"]  # W&B: the same id again
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']['id']}"))) == 2


def test_the_runs_of_a_study_share_the_study_s_mlflow_store(tiny_config: dict, tmp_path: Path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tiny_config["output"].update(report_to=["mlflow"], name="seeds")
    tiny_config["train"].update(seeds=[1, 2], max_steps=2)
    result = lmtune.train(tiny_config)
    store = Path(tiny_config["output"]["dir"]) / "mlflow.db"
    assert store.is_file() and not list(result.run_dir.rglob("mlflow.db"))  # beside the study, not in it
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["seed-1", "seed-2"]
