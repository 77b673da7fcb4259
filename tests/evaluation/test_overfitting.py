"""Overfitting diagnosis: synthetic metrics.jsonl records, and a tiny run made to overfit."""

from __future__ import annotations

import json

import pytest

from lmtune.evaluation.overfitting import diagnose, eval_history


def records(train_losses: list[float], evals: dict[int, tuple[float, float]]) -> list[dict]:
    """Train loss logged at steps 1..n; at the steps in `evals`, (validation loss, accuracy)."""
    out = []
    for step, loss in enumerate(train_losses, start=1):
        out.append({"step": step, "stage": "full", "train/loss": loss})
        if step in evals:
            out.append({"step": step, "stage": "full", "eval/loss": evals[step][0], "eval/accuracy": evals[step][1]})
    return out


OVERFIT = records([1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05],
                  {2: (0.7, 0.80), 4: (0.5, 0.912), 6: (0.8, 0.905), 8: (1.1, 0.891)})


def test_overfit_run_is_named_with_peak_drop_and_training_loss() -> None:
    d = diagnose(OVERFIT, "accuracy", greater_is_better=True)
    assert d["overfit"] is True
    assert (d["peak_step"], d["peak_value"], d["final_step"]) == (4, 0.912, 8)
    assert d["drop"] == pytest.approx(2.1) and d["drop_unit"] == "points"
    assert d["validation_loss_trend"] == "rising" and d["train_loss_falling_after_peak"]
    assert d["message"] == ("validation accuracy peaked at step 4 (0.912) and fell 2.1 points by step 8 while "
                            "training loss kept falling (0.5 -> 0.075): the run overfit; the best checkpoint "
                            "(step 4) was kept.")
    # train loss is the mean of the losses logged since the previous evaluation; gap = val - train loss
    assert [r["train_loss"] for r in d["history"]] == pytest.approx([0.9, 0.5, 0.25, 0.075])
    assert d["history"][-1]["gap"] == pytest.approx(1.1 - 0.075)
    assert "final weights are from step 8" in diagnose(OVERFIT, "accuracy", True, best_kept=False)["message"]


def test_still_improving_and_noise_are_not_overfitting() -> None:
    improving = records([1.0, 0.8, 0.6, 0.4], {2: (0.7, 0.8), 4: (0.5, 0.9)})
    d = diagnose(improving, "eval/accuracy", greater_is_better=True)
    assert not d["overfit"] and d["message"].startswith("no sign of overfitting: validation accuracy was still "
                                                        "improving at the end")
    noisy = records([1.0, 0.8, 0.6, 0.4], {2: (0.7, 0.900), 4: (0.71, 0.896)})  # 0.4 points: noise
    d = diagnose(noisy, "accuracy", greater_is_better=True)
    assert not d["overfit"] and "within noise" in d["message"]
    assert not diagnose(noisy, "accuracy", True, min_delta=0.001)["overfit"]


def test_drop_without_falling_training_loss_is_instability() -> None:
    unstable = records([1.0, 0.6, 0.7, 0.9], {2: (0.6, 0.85), 4: (0.9, 0.70)})
    d = diagnose(unstable, "accuracy", greater_is_better=True)
    assert not d["overfit"] and "did not keep falling" in d["message"]


def test_no_training_loss_at_the_peak_is_said_not_called_instability() -> None:
    sparse = [r for r in OVERFIT if "eval/loss" in r or r["step"] > 4]  # nothing logged up to the peak
    d = diagnose(sparse, "accuracy", greater_is_better=True)
    assert not d["overfit"] and "no training loss was logged by then (train.log_every)" in d["message"]


def test_the_loop_logs_the_training_loss_at_every_evaluation(tiny_config) -> None:
    import lmtune

    tiny_config["train"].update(epochs=2, log_every=100)  # epochs of 9 steps: evaluations at 9 and 18
    result = lmtune.train(tiny_config)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == [9, 18]
    assert all(row["train_loss"] is not None for row in result.metrics["overfitting"]["history"])


def test_lower_is_better_metric_rises_in_its_own_units() -> None:
    d = diagnose(OVERFIT, "loss", greater_is_better=False)
    assert d["overfit"] and d["peak_step"] == 4 and d["drop_unit"] == "value"
    assert d["drop"] == pytest.approx(0.6) and "loss peaked at step 4 (0.5) and rose 0.6 by step 8" in d["message"]


def test_too_few_evaluations() -> None:
    d = diagnose(records([1.0, 0.5], {2: (0.5, 0.9)}), "accuracy", True)
    assert d["evaluations"] == 1 and not d["overfit"] and "not enough evaluations" in d["message"]
    assert eval_history([], "accuracy") == []


def test_real_tiny_run_made_to_overfit(tiny_config, tmp_path) -> None:
    """Random labels on 16 training rows, 10 epochs at a high constant learning rate, no dropout: the model
    memorises its training set (training loss falls) and the validation loss, the selection metric here, turns up."""
    import random

    import lmtune
    from helpers import make_sentiment_rows, write_csv

    rows = make_sentiment_rows(32, seed=3)
    rng = random.Random(0)
    for row in rows:
        row["label"] = rng.choice(["positive", "negative"])
    tiny_config["model"]["dropout"] = 0.0
    tiny_config["data"] = {"train": str(write_csv(tmp_path / "noise.csv", rows)), "validation_size": 0.5,
                           "test_size": 0}
    tiny_config["train"].update(epochs=10, batch_size=4, lr=1e-2, schedule="constant", log_every=1, checkpoint=False)
    tiny_config["eval"] = {"metric": "loss"}
    result = lmtune.train(tiny_config)
    d = json.loads((result.run_dir / "metrics.json").read_text())["overfitting"]
    assert d["evaluations"] == 10 and d["metric"] == "loss"
    assert d["overfit"], d["message"]
    assert d["peak_step"] < d["final_step"] and d["train_loss_final"] < d["train_loss_at_peak"]
    assert "the run overfit; the best checkpoint" in d["message"]
    assert (result.run_dir / "plots" / "overfitting.png").read_bytes()[:4] == b"\x89PNG"
