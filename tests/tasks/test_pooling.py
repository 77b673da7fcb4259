"""Pooling heads (task.pooling, task.head): each mode trains and comes back from disk exactly; `auto` reads a
sentence-embedding checkpoint's pooling; the pooling itself is right whichever side the padding is on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lmtune
from lmtune.tasks.pooling import pool


def _config(tiny_config: dict, name: str, method: str = "full", **task: object) -> dict:
    cfg = json.loads(json.dumps(tiny_config))
    cfg["task"].update(task)
    cfg["method"] = {"name": method}
    cfg["train"].update({"epochs": 2})
    cfg["output"]["name"] = name
    return cfg


@pytest.mark.parametrize("pooling, head, method", [
    ("cls", "linear", "full"), ("pooler", "linear", "full"), ("mean", "mlp", "full"), ("max", "linear", "full"),
    ("last", "linear", "full"), ("mean", "linear", "head"), ("max", "mlp", "lora")])
def test_each_pooling_trains_and_reloads_to_identical_predictions(tiny_config: dict, sentiment_files: dict,
                                                                  pooling: str, head: str, method: str) -> None:
    cfg = _config(tiny_config, f"{pooling}-{head}-{method}", method, pooling=pooling, head=head, head_hidden=24)
    result = lmtune.train(cfg)
    first = result.metrics["stages"]
    assert first, result.metrics
    saved = json.loads((result.run_dir / "model" / ("base_config/config.json" if method == "lora" else
                                                     "config.json")).read_text())
    assert saved["lmtune_pooling"] == pooling and saved["lmtune_head"] == head
    # the test set scored in the run and scored again from disk: the same head, the same numbers
    again = lmtune.evaluate(result.run_dir, sentiment_files["test"])
    assert again["loss"] == pytest.approx(result.metrics["test"]["loss"], abs=1e-5)
    assert again["accuracy"] == result.metrics["test"]["accuracy"]
    model = lmtune.load(result.run_dir)
    inner = model.session.model
    inner = getattr(inner, "base_model", inner).model if method == "lora" else inner
    assert not hasattr(inner, "classifier")  # the class's own head is gone, not left unused
    if pooling != "pooler":
        assert inner.bert.pooler is None
    card = (result.run_dir / "model" / "README.md").read_text()
    assert f"lmtune's own ({pooling} pooling" in card and "pipeline(" not in card
    texts = ["a wonderful film", "terrible and dull"]
    assert [p["scores"] for p in model.predict(texts)] == [p["scores"] for p in lmtune.load(result.run_dir).predict(texts)]
    if (pooling, method) in (("mean", "full"), ("max", "lora")):  # an HF export carries the head and loads back
        from lmtune.predict import export

        exported = export(result.run_dir, result.run_dir.parent / f"{result.run_dir.name}-hf", merge=True)
        assert "Load it with lmtune" in (exported / "README.md").read_text()
        for ours, run in zip(lmtune.load(exported).predict(texts), model.predict(texts)):
            assert ours["label"] == run["label"] and ours["scores"] == pytest.approx(run["scores"], abs=1e-5)


def test_the_head_learns(tiny_config: dict) -> None:
    """mean pooling and an MLP head fit the synthetic sentiment (a head that never saw the pooled vector would not)."""
    cfg = _config(tiny_config, "learns", pooling="mean", head="mlp")
    cfg["train"].update({"epochs": 6})
    result = lmtune.train(cfg)
    assert result.metrics["test"]["accuracy"] >= 0.85, result.metrics["test"]


def _sentence_embedding_copy(tiny_model_dir: Path, target: Path, settings: dict) -> Path:
    shutil.copytree(tiny_model_dir, target)
    (target / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **settings}))
    return target


def test_auto_takes_a_sentence_embedding_checkpoints_pooling(tiny_config: dict, tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    mean = _sentence_embedding_copy(tiny_model_dir, tmp_path / "st-mean", {"pooling_mode_mean_tokens": True,
                                                                          "pooling_mode_cls_token": False})
    cfg = _config(tiny_config, "auto-mean")
    cfg["model"]["name"] = str(mean)
    cfg["train"].update({"max_steps": 2})
    run = lmtune.train(cfg).run_dir
    assert json.loads((run / "model" / "config.json").read_text())["lmtune_pooling"] == "mean"
    # a checkpoint without one keeps the transformers class's own head (BERT's pooler + classifier)
    cfg = _config(tiny_config, "auto-plain")
    cfg["train"].update({"max_steps": 2})
    run = lmtune.train(cfg).run_dir
    assert "lmtune_pooling" not in json.loads((run / "model" / "config.json").read_text())
    assert hasattr(lmtune.load(run).session.model, "classifier")


def test_pooler_on_a_model_without_one_is_refused_before_training(tiny_config: dict, tiny_decoder_dir: Path) -> None:
    cfg = _config(tiny_config, "no-pooler", pooling="pooler")
    cfg["model"]["name"] = str(tiny_decoder_dir)
    with pytest.raises(Exception, match="task.pooling: pooler"):
        lmtune.train(cfg)


def test_a_decoder_classifies_from_its_last_real_token(tiny_config: dict, tiny_decoder_dir: Path,
                                                       sentiment_files: dict) -> None:
    cfg = _config(tiny_config, "decoder-last", pooling="last", head="mlp")
    cfg["model"]["name"] = str(tiny_decoder_dir)
    cfg["train"].update({"max_steps": 4})
    result = lmtune.train(cfg)
    again = lmtune.evaluate(result.run_dir, sentiment_files["test"])
    assert again["loss"] == pytest.approx(result.metrics["test"]["loss"], abs=1e-5)


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "last"])
def test_pooling_reads_the_real_tokens_whichever_side_the_padding_is_on(mode: str) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 4)  # row 0: 3 real tokens; row 1: 2 real tokens, then padding
    right = torch.tensor([[1, 1, 1], [1, 1, 0]])
    left_hidden = hidden.clone()
    left_hidden[1] = torch.cat([torch.full((1, 4), 99.0), hidden[1, :2]])  # row 1 padded on the left instead
    left = torch.tensor([[1, 1, 1], [0, 1, 1]])
    expected = {"cls": hidden[1, 0], "mean": hidden[1, :2].mean(0), "max": hidden[1, :2].max(0).values,
                "last": hidden[1, 1]}[mode]
    assert torch.allclose(pool(mode, hidden, right, None)[1], expected)
    if mode != "cls":  # ([CLS] is the first token: left padding is for decoders, which pool the last)
        assert torch.allclose(pool(mode, left_hidden, left, None)[1], expected)
    assert torch.allclose(pool(mode, hidden, right, None)[0], {"cls": hidden[0, 0], "mean": hidden[0].mean(0),
                                                               "max": hidden[0].max(0).values,
                                                               "last": hidden[0, 2]}[mode])


def test_multi_label_and_regression_heads_come_back_from_disk(tiny_model_dir: Path, tmp_path: Path) -> None:
    from helpers import write_csv, write_jsonl

    rows = [{"text": f"great film {i}", "labels": ["pos", "film"]} if i % 2 else
            {"text": f"awful drug {i}", "labels": ["neg"]} for i in range(64)]
    multi = {"model": {"name": str(tiny_model_dir)},
             "data": {"train": str(write_jsonl(tmp_path / "m.jsonl", rows)), "label_column": "labels",
                      "validation_size": 0.25, "test_size": 0},
             "task": {"name": "classification", "multi_label": True, "pooling": "max", "head": "mlp"},
             "train": {"epochs": 6, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0},
             "output": {"dir": str(tmp_path / "runs"), "name": "multi"}}
    result = lmtune.train(multi)
    assert result.metrics["validation"]["micro_f1"] > 0.9
    preds = lmtune.load(result.run_dir).predict(["great film", "awful drug"])
    assert sorted(preds[0]["labels"]) == ["film", "pos"] and preds[1]["labels"] == ["neg"]
    scored = [{"text": r["text"], "score": str(len(r["labels"]))} for r in rows]
    regression = {"model": {"name": str(tiny_model_dir)},
                  "data": {"train": str(write_csv(tmp_path / "r.csv", scored)), "label_column": "score",
                           "validation_size": 0.25, "test_size": 0},
                  "task": {"name": "regression", "pooling": "mean", "head": "mlp"},
                  "train": {"epochs": 6, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0},
                  "output": {"dir": str(tmp_path / "runs"), "name": "reg"}}
    result = lmtune.train(regression)
    assert result.metrics["validation"]["pearson"] > 0.9
    again = lmtune.evaluate(result.run_dir, tmp_path / "r.csv")
    (low, high) = lmtune.load(result.run_dir).predict(["awful drug", "great film"])
    assert low["score"] < 1.5 < high["score"] and again["pearson"] > 0.9
