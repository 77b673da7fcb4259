"""The head method: only new weights train, and the feature cache gives the same result, faster."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmtune


@pytest.fixture(scope="module")
def no_dropout_model(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model without dropout, so that cached and uncached features are exactly equal."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny-no-dropout")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    model = BertModel.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(folder)
    return folder


def test_cached_features_train_the_same_head(tiny_config: dict, no_dropout_model: Path, caplog) -> None:
    tiny_config["model"]["name"] = str(no_dropout_model)
    tiny_config["train"].update(epochs=3, eval_every=4)
    results = {}
    for cache in (True, False):
        tiny_config["method"] = {"name": "head", "lr": 1e-2, "cache_features": cache}
        tiny_config["output"]["name"] = f"cache-{cache}"
        with caplog.at_level("INFO", logger="lmtune"):
            results[cache] = lmtune.train(tiny_config)
    assert "cached frozen features of 72 rows" in caplog.text
    assert results[True].metrics["stages"]["head"]["feature_cache"] is True
    assert results[False].metrics["stages"]["head"]["feature_cache"] is False
    a = load_file(str(results[True].run_dir / "model" / "model.safetensors"))
    b = load_file(str(results[False].run_dir / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    for split in ("validation", "test"):
        assert results[True].metrics[split]["loss"] == pytest.approx(results[False].metrics[split]["loss"], rel=1e-4)


def test_cache_falls_back_when_the_trunk_trains(tiny_config: dict, caplog) -> None:
    """A stage that trains a layer inside the stack cannot use stored features; it says why."""
    from typing import Literal

    from pydantic import BaseModel

    from lmtune.methods import Method, ParamGroup, Stage
    from lmtune.registry import METHODS

    class LeakyOptions(BaseModel):
        name: Literal["leaky"] = "leaky"

    class Leaky(Method):  # a method registered outside lmtune, written against the contract
        Options = LeakyOptions

        @staticmethod
        def apply(model, info, options):
            names = info.head_names + ["bert.encoder.layer.1.output.dense.bias"]
            return [Stage("head", [ParamGroup(names, lr=1e-2)], cache_features=True)]

    METHODS["leaky"] = Leaky
    try:
        tiny_config["method"] = {"name": "leaky"}
        tiny_config["train"]["max_steps"] = 2
        with caplog.at_level("INFO", logger="lmtune"):
            result = lmtune.train(tiny_config)
    finally:
        del METHODS["leaky"]
    assert "features not cached: 1 parameters inside bert.encoder train" in caplog.text
    assert result.metrics["stages"]["head"]["feature_cache"] is False


def test_the_caching_pass_counts_in_the_stage_time(tiny_config: dict, monkeypatch) -> None:
    import time

    from lmtune.training import loop

    build = loop.ensure_cached

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return build(*args, **kwargs)

    monkeypatch.setattr(loop, "ensure_cached", slow)
    tiny_config["method"] = {"name": "head", "lr": 1e-2}
    tiny_config["train"]["max_steps"] = 2
    tiny_config["data"]["validation_size"] = 0  # only the training set's caching pass: no evaluation to cache
    result = lmtune.train(tiny_config)
    assert result.metrics["stages"]["head"]["seconds"] >= 1.0 and result.metrics["train_seconds"] >= 1.0
