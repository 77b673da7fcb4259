"""Calibration: ECE and Brier as defined, temperature scaling fitted on validation, saved with the model and applied
by predict."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lmtune
from lmtune.config import ConfigError
from lmtune.evaluation.calibration import calibration, fit_temperature, nll, softmax


def test_ece_and_brier_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    gold = np.array([0, 1, 1, 1])
    scores, diagram = calibration(probs, gold)
    # Confidences 0.9, 0.6, 0.8, 0.7 fall in four bins; right, wrong, right, right.
    assert scores["ece"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.3) / 4)
    assert scores["brier"] == pytest.approx((0.02 + 0.72 + 0.08 + 0.18) / 4)
    assert sum(b["count"] for b in diagram["bins"]) == 4 and len(diagram["bins"]) == 15


def test_temperature_scaling_cools_an_over_confident_model() -> None:
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 2000)
    noisy = np.where(rng.random(2000) < 0.3, rng.integers(0, 3, 2000), gold)  # 30% of the evidence points elsewhere
    logits = 8.0 * np.eye(3)[noisy] + rng.normal(0, 1, (2000, 3))  # and the model is sure of it
    t = fit_temperature(logits, gold)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2000))
    assert t == pytest.approx(grid[np.argmin([nll(logits, gold, g) for g in grid])], rel=0.01)
    assert t > 2 and nll(logits, gold, t) < 0.8 * nll(logits, gold)
    before = calibration(softmax(logits), gold)[0]["ece"]
    assert calibration(softmax(logits, t), gold)[0]["ece"] < 0.5 * before


def test_a_calibrated_run_saves_its_temperature_and_predict_uses_it(tiny_config: dict) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tiny_config["eval"] = {"calibrate": "temperature"}
    result = lmtune.train(tiny_config)
    report = result.metrics["calibration"]
    t = report["temperature"]
    assert report["validation"]["nll_after"] <= report["validation"]["nll_before"] + 1e-9
    assert {"ece", "brier"} <= set(result.metrics["test"]) and "ece_after" in report["test"]
    saved = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert saved["lmtune_temperature"] == pytest.approx(t)
    text = "a great and lovely film"
    model = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    with torch.no_grad():
        logits = model(**tokenizer([text], return_tensors="pt")).logits.numpy()
    expected = softmax(logits, t)[0]
    got = lmtune.load(result.run_dir).predict([text])[0]
    assert got["score"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert (result.run_dir / "plots" / "reliability_test.png").is_file()
    assert "Calibration (temperature scaling)" in (result.run_dir / "report.html").read_text()


def test_calibrate_is_refused_where_it_cannot_fit(tiny_config: dict) -> None:
    tiny_config["eval"] = {"calibrate": "temperature"}
    tiny_config["task"]["multi_label"] = True
    with pytest.raises(ConfigError, match="eval.calibrate"):
        lmtune.train(tiny_config)
    tiny_config["task"]["multi_label"] = False
    tiny_config["data"]["validation_size"] = 0
    with pytest.raises(ConfigError, match="validation"):
        lmtune.train(tiny_config)
