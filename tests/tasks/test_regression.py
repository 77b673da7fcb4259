"""Regression: real-valued targets (one or several), standardised for training, predicted back in their units."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import lmtune
from helpers import write_csv

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "stsb"


def counted_rows(n: int, seed: int) -> list[dict]:
    """Texts whose targets are how many good and bad words they hold, on scales of their own."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        words = ["great"] * good + ["awful"] * bad + ["film", "the", "a"][: rng.randint(1, 3)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "stars": str(10 + 20 * good), "minus": str(-0.5 * bad)})
    return rows


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_regression_recovers_linear_targets_in_their_own_units(tiny_model_dir: Path, tmp_path: Path, loss: str) -> None:
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(write_csv(tmp_path / "train.csv", counted_rows(320, 1))),
                    "test": str(write_csv(tmp_path / "test.csv", counted_rows(60, 2))),
                    "validation_size": 0.15, "label_column": ["stars", "minus"]},
           "task": {"name": "regression", "loss": loss}, "method": {"name": "full"},
           "train": {"epochs": 16, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0},
           "output": {"dir": str(tmp_path / "runs"), "name": loss}}
    result = lmtune.train(cfg)
    test = result.metrics["test"]
    assert result.metrics["selection"]["metric"] == "pearson"
    assert test["pearson"] > 0.85 and test["per_target"]["stars"]["rmse"] < 15, test
    saved = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert saved["lmtune_target_mean"][0] == pytest.approx(result.metrics["data"]["target_mean"][0])
    preds = lmtune.load(result.run_dir).predict(["great great great film", "awful awful the"])
    assert preds[0]["scores"]["stars"] > 45 and preds[1]["scores"]["stars"] < 35  # 70 and 10 in truth
    assert preds[1]["scores"]["minus"] < preds[0]["scores"]["minus"] - 0.4  # -1 against 0
    mistakes = json.loads((result.run_dir / "mistakes.json").read_text())["test"]
    assert mistakes and mistakes[0]["score"] >= mistakes[-1]["score"]


def test_a_single_target_predicts_a_score(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = counted_rows(64, 3)
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(write_csv(tmp_path / "train.csv", rows)), "label_column": "stars"},
           "task": {"name": "regression"}, "method": {"name": "full"}, "train": {"max_steps": 3, "batch_size": 8},
           "output": {"dir": str(tmp_path / "runs"), "name": "one"}}
    run = lmtune.train(cfg).run_dir
    (pred,) = lmtune.load(run).predict(["great film"])
    assert set(pred) == {"score"} and isinstance(pred["score"], float)
    tiny = [{**row, "stars": f"{float(row['stars']) * 1e-9:.3e}"} for row in rows]  # targets of 1e-8 to 7e-8
    cfg["data"]["train"] = str(write_csv(tmp_path / "tiny.csv", tiny))
    cfg["output"]["name"] = "tiny"
    (pred,) = lmtune.load(lmtune.train(cfg).run_dir).predict(["great film"])
    assert 1e-9 < abs(pred["score"]) < 1e-6  # seven significant digits, not six decimals (0.0)


def test_a_target_that_is_not_a_number_names_its_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = counted_rows(20, 4)
    rows[6]["stars"] = "n/a"
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(write_csv(tmp_path / "train.csv", rows)), "label_column": "stars"},
           "task": {"name": "regression"}, "output": {"dir": str(tmp_path / "runs")}}
    from lmtune.errors import DataError

    with pytest.raises(DataError, match=r"row 7, field 'stars': the target is not a finite number \('n/a'\)"):
        lmtune.train(cfg)


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/data/stsb")
def test_stsb_quotes_are_plain_characters_with_quoting_none() -> None:
    from lmtune.data import read_table

    for name in ("train", "dev", "test"):
        path = SHARED / f"{name}.tsv"
        lines = path.read_text(encoding="utf-8").count("\n") - 1  # less the header
        ds = read_table(path, quoting="none")
        assert len(ds) == lines
        quoted = [t for t in ds["sentence1"][:] + ds["sentence2"][:] if t.startswith('"')]
        assert quoted  # kept as written


def test_correlations_match_worked_examples() -> None:
    from lmtune.evaluation.correlation import pearson, ranks, spearman

    assert list(ranks([10, 20, 20, 5])) == [2.0, 3.5, 3.5, 1.0]  # ties share their average rank
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(0.984374, abs=1e-6)
    # rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) without ties: d = (0, -2, 1, 1) -> 1 - 36 / 60
    assert spearman([1, 2, 3, 4], [1, 4, 2, 3]) == pytest.approx(0.4)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant: no correlation to speak of


def test_inspect_compare_search_and_seeds_work_for_regression(tiny_model_dir: Path, tmp_path: Path) -> None:
    import csv

    import yaml
    from typer.testing import CliRunner

    from lmtune.cli import app

    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(write_csv(tmp_path / "train.csv", counted_rows(96, 4))),
                    "test": str(write_csv(tmp_path / "test.csv", counted_rows(24, 5))), "label_column": "stars"},
           "task": {"name": "regression"}, "method": {"name": "full"},
           "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3}, "output": {"dir": str(tmp_path / "runs")}}
    config = tmp_path / "reg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(config)])
    assert result.exit_code == 0, result.output
    profile = json.loads((tmp_path / "runs" / "reg-inspect" / "inspect.json").read_text())
    assert profile["splits"]["train"]["targets"]["stars"]["max"] <= 70
    result = runner.invoke(app, ["compare", str(config), "--methods", "full,lora", "--seeds", "2",
                                 "-o", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["full", "lora"] and all(r["seeds"] == "2" for r in rows), rows
    assert "| test pearson |" in (tmp_path / "cmp" / "compare.md").read_text()
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"search": {"trials": 2, "pruner": "none", "space": {
        "train.lr": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True}}}}))
    result = runner.invoke(app, ["search", str(config), "--space", str(space), "output.name=tuned"])
    assert result.exit_code == 0, result.output
    assert "pearson" in (tmp_path / "runs" / "tuned" / "trials.md").read_text()
    result = runner.invoke(app, ["train", str(config), "--seeds", "2", "output.name=seeded"])
    assert result.exit_code == 0, result.output
    assert "pearson" in result.output
