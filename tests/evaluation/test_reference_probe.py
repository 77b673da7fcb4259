"""eval.reference_probe: a linear probe on the backbone's features for a labelled reference task, before and after
training; equal when the backbone does not train, lower when it is scrambled."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import lmtune
from helpers import make_sentiment_rows, write_csv
from lmtune.config import EvalConfig
from lmtune.errors import ConfigError
from lmtune.evaluation.forgetting import reference_probe


def _probe_config(path: Path) -> dict:
    return {"data": {"train": str(path)}, "task": {"name": "classification"}, "max_examples": 80, "folds": 4}


def test_a_frozen_backbone_keeps_its_reference_score(tiny_config: dict, tmp_path: Path) -> None:
    reference = write_csv(tmp_path / "reference.csv", make_sentiment_rows(80, seed=4))
    tiny_config["method"] = {"name": "head"}
    tiny_config["eval"] = {"reference_probe": _probe_config(reference)}
    result = lmtune.train(tiny_config)
    forgetting = result.metrics["forgetting"]
    assert forgetting["reference_probe_before"] > 0.7  # the sentiment words are there to be read
    assert forgetting["reference_probe_after"] == forgetting["reference_probe_before"]
    assert forgetting["reference_probe_drop"] == 0.0
    assert forgetting["reference_probe"]["metric"] == "accuracy" and forgetting["reference_probe"]["examples"] == 80
    assert "reference_probe_drop" in (result.run_dir / "report.html").read_text()


def test_a_scrambled_backbone_loses_the_reference_task(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reference = write_csv(tmp_path / "reference.csv", make_sentiment_rows(80, seed=4))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    session = SimpleNamespace(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), max_length=64,
                              accelerator=Accelerator(cpu=True))
    after = reference_probe(EvalConfig(reference_probe=_probe_config(reference)), session, seed=3)
    with torch.no_grad():  # every word the same vector: nothing left to tell the texts apart
        model.bert.embeddings.word_embeddings.weight.copy_(model.bert.embeddings.word_embeddings.weight[5].clone())
    result = after()
    assert result["reference_probe_before"] > 0.7
    assert result["reference_probe_drop"] > 0.2, result


def test_the_reference_probe_config_is_checked() -> None:
    with pytest.raises(Exception, match="eval.reference_probe.task.name"):
        EvalConfig(reference_probe={"data": {"train": "x.csv"}, "task": {"name": "qa"}})
    with pytest.raises(Exception, match="eval.reference_probe.data.text_colum"):
        EvalConfig(reference_probe={"data": {"train": "x.csv", "text_colum": "t"}})
    with pytest.raises(ConfigError, match="reference_probe"):
        lmtune.train({"eval": {"reference_probe": {"data": {}}}})


def test_compare_shows_the_forgetting_figures_as_columns(tiny_config: dict, tmp_path: Path) -> None:
    import csv

    import yaml
    from typer.testing import CliRunner

    from lmtune.cli import app

    reference = write_csv(tmp_path / "reference.csv", make_sentiment_rows(80, seed=4))
    tiny_config["eval"] = {"reference_probe": _probe_config(reference)}
    tiny_config["train"]["epochs"] = 1
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["compare", str(config), "--methods", "head,full", "-o", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "c" / "compare.csv").open())}
    assert float(rows["head"]["reference probe drop mean"]) == 0.0  # the frozen backbone lost nothing
    assert rows["full"]["reference probe drop mean"] != ""
    assert "| reference probe drop |" in (tmp_path / "c" / "compare.md").read_text()
