"""The task contract is enough to add a task: one file outside lmtune (tests/toy_task.py), registered here, trains,
evaluates and predicts under every built-in method."""

from __future__ import annotations

from pathlib import Path

import pytest

import lmtune
from helpers import make_sentiment_rows, write_csv
from lmtune.methods import METHODS
from lmtune.registry import register_task
from lmtune.tasks import TASKS

METHOD_OPTIONS = {"lora": {"r": 2}, "partial": {"layers": 1}, "lp_ft": {"probe_epochs": 1, "epochs": 1}}


@pytest.fixture
def toy_task():
    from toy_task import ToySentiment

    register_task("toy_sentiment")(ToySentiment)
    yield ToySentiment
    del TASKS["toy_sentiment"]  # the other tests see the built-in tasks only


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_task_from_outside_trains_evaluates_and_predicts(method: str, toy_task, tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", make_sentiment_rows(32, seed=1))
    test = write_csv(tmp_path / "test.csv", make_sentiment_rows(8, seed=2))
    cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(train), "test": str(test)},
           "task": {"name": "toy_sentiment"}, "method": {"name": method, **METHOD_OPTIONS.get(method, {})},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "eval_every": 1},
           "output": {"dir": str(tmp_path / "runs"), "name": method}}
    result = lmtune.train(cfg)
    assert result.metrics["data"]["rows"] == {"train": 24, "validation": 8, "test": 8}
    assert 0 <= result.metrics["test"]["accuracy"] <= 1 and result.metrics["selection"]["metric"] == "accuracy"
    assert lmtune.evaluate(result.run_dir, str(test))["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    preds = lmtune.load(result.run_dir).predict(["great film", {"text": "awful drug"}])
    assert [p["label"] in ("negative", "positive") for p in preds] == [True, True]
