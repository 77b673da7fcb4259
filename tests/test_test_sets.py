"""Several named test sets (data.test: {name: file}): each evaluated and reported under its name, the first the
headline `test`, the others `test:<name>`, through metrics.json, console, plots, report, card, compare and seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import lmtune
from helpers import make_sentiment_rows, write_csv
from lmtune.cli import app
from lmtune.errors import ConfigError


def _named(tiny_config: dict, tmp_path: Path) -> dict:
    ood = write_csv(tmp_path / "ood.csv", make_sentiment_rows(20, seed=9))
    # not in alphabetical order: a config copied with sorted keys would make the wrong set the headline
    tiny_config["data"]["test"] = {"indomain": tiny_config["data"]["test"], "imdb": str(ood)}
    tiny_config["train"]["epochs"] = 1
    return tiny_config


def test_each_named_test_set_is_evaluated_and_reported(tiny_config: dict, tmp_path: Path) -> None:
    cfg = _named(tiny_config, tmp_path)
    config = tmp_path / "named.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    run = Path(cfg["output"]["dir"]) / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["rows"]["test"] == 32 and metrics["data"]["rows"]["test:imdb"] == 20
    assert metrics["data"]["test_sets"] == {"test": "indomain", "test:imdb": "imdb"}
    assert set(metrics["test"]) >= {"accuracy", "macro_f1"} and set(metrics["test:imdb"]) >= {"accuracy", "macro_f1"}
    # the second set scored alone by `lmtune eval` gives the same numbers
    alone = lmtune.evaluate(run, cfg["data"]["test"]["imdb"])
    assert alone["accuracy"] == metrics["test:imdb"]["accuracy"]
    assert "test:imdb (20 rows)" in " ".join(result.output.split())
    assert (run / "plots" / "confusion_test-imdb.png").is_file() and (run / "plots" / "confusion_test.png").is_file()
    assert "test:imdb" in (run / "report.html").read_text()
    card = (run / "model" / "README.md").read_text()
    assert "| test:imdb | accuracy |" in card and "ood.csv" in card


def test_compare_and_seeds_carry_the_other_test_sets(tiny_config: dict, tmp_path: Path) -> None:
    cfg = _named(tiny_config, tmp_path)
    config = tmp_path / "named.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(config), "--methods", "head,full", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert all(r["test:imdb accuracy mean"] for r in rows), rows
    assert "| test:imdb accuracy |" in (out / "compare.md").read_text()
    result = lmtune.train(cfg | {"train": {**cfg["train"], "seeds": [1, 2]},
                                 "output": {**cfg["output"], "name": "seeded"}})
    assert set(result.metrics["test:imdb"]) >= {"accuracy"} and result.metrics["test:imdb"]["accuracy"]["n"] == 2
    assert "| test:imdb | accuracy |" in (result.run_dir / "seeds.md").read_text()


def test_test_set_names_are_checked(tiny_config: dict) -> None:
    tiny_config["data"]["test"] = {"in:domain": tiny_config["data"]["test"]}
    with pytest.raises(ConfigError, match="test set name 'in:domain'"):
        lmtune.train(tiny_config)
    tiny_config["data"]["test"] = {}
    with pytest.raises(ConfigError, match="an empty mapping"):
        lmtune.train(tiny_config)


def test_a_test_set_with_columns_of_its_own(tiny_config: dict, tmp_path: Path) -> None:
    """An out-of-domain file whose text and labels are named and written differently (as IMDB's beside SST-2's)."""
    other = [{"review": r["text"], "stars": {"positive": "1", "negative": "0"}[r["label"]]}
             for r in make_sentiment_rows(20, seed=9)]
    tiny_config["data"]["test"] = {"indomain": tiny_config["data"]["test"],
                                   "reviews": {"path": str(write_csv(tmp_path / "reviews.csv", other)),
                                               "text_column": "review", "label_column": "stars",
                                               "label_map": {0: "negative", 1: "positive"}}}
    tiny_config["train"]["epochs"] = 2
    result = lmtune.train(tiny_config)
    assert result.metrics["data"]["rows"]["test:reviews"] == 20
    assert set(result.metrics["test:reviews"]["per_class"]) == {"negative", "positive"}
    # the same rows in the run's own columns score the same
    same = lmtune.evaluate(result.run_dir, write_csv(tmp_path / "same.csv", make_sentiment_rows(20, seed=9)))
    assert same["accuracy"] == result.metrics["test:reviews"]["accuracy"]
    assert same["loss"] == pytest.approx(result.metrics["test:reviews"]["loss"], abs=1e-6)
    tiny_config["data"]["test"]["reviews"]["colour"] = "x"
    with pytest.raises(ConfigError, match="data.test.reviews.colour: a test set may set only"):
        lmtune.train(tiny_config)


def test_a_resumed_run_keeps_the_commits_its_named_hub_test_sets_were_pinned_to() -> None:
    from lmtune.config import load_config
    from lmtune.rundir import keep_pins

    commit = "0123456789abcdef0123456789abcdef01234567"
    given = load_config({"data": {"train": "t.csv", "test": {
        "own": "d.csv", "hub": "hf:org/ds:test", "wide": {"path": "hf:org/other/cfg:test", "text_column": "text"}}}})
    saved = load_config({"data": {"train": "t.csv", "test": {
        "own": "d.csv", "hub": f"hf:org/ds@{commit}:test",
        "wide": {"path": f"hf:org/other@{commit}/cfg:test", "text_column": "text"}}}})
    kept = keep_pins(given, saved).data.test
    assert kept == {"own": "d.csv", "hub": f"hf:org/ds@{commit}:test",
                    "wide": {"path": f"hf:org/other@{commit}/cfg:test", "text_column": "text"}}
