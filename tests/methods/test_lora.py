"""LoRA family through peft: adapters train, the head is saved with them, reload and merge agree."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmtune
from lmtune.errors import ConfigError
from lmtune.predict import export

TEXTS = ["great excellent film", "awful terrible film", "some time it was", "best drug, love it"]


@pytest.fixture(scope="module")
def no_pooler_model(tiny_model_dir, tmp_path_factory) -> Path:
    """Like MiniLM: the checkpoint has no pooler, so the pooler is a new weight that must be saved."""
    import shutil

    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny-no-pooler")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    BertModel.from_pretrained(tiny_model_dir, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, no_pooler_model) -> lmtune.RunResult:
    from helpers import make_sentiment_rows, write_csv

    root = tmp_path_factory.mktemp("lora")
    cfg = {"model": {"name": str(no_pooler_model)},
           "data": {"train": str(write_csv(root / "train.csv", make_sentiment_rows(96, seed=1))),
                    "test": str(write_csv(root / "test.csv", make_sentiment_rows(32, seed=2))),
                    "validation_size": 0.25},
           "method": {"name": "lora", "r": 8, "alpha": 32},
           "train": {"epochs": 4, "batch_size": 8, "lr": 2e-2, "warmup_ratio": 0.0, "log_every": 3, "seed": 7},
           "output": {"dir": str(root / "runs"), "name": "lora"}}
    return lmtune.train(cfg)


def test_only_the_adapter_and_head_are_saved(lora_run) -> None:
    folder = lora_run.run_dir / "model"
    assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in saved) and any("classifier" in k for k in saved)
    assert any("pooler" in k for k in saved)  # new in this model: trained and saved whole, like the head
    assert not any("word_embeddings" in k for k in saved)
    m = lora_run.metrics
    assert m["params"]["trainable"] < 0.5 * m["params"]["total"]
    losses = [json.loads(line)["train/loss"] for line in (lora_run.run_dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert losses[-1] < losses[0]


def test_backbone_weights_stay_frozen(lora_run, no_pooler_model) -> None:
    model = lmtune.load(lora_run.run_dir).session.model
    base = load_file(str(no_pooler_model / "model.safetensors"))
    live = dict(model.get_base_model().named_parameters())
    key = "encoder.layer.0.attention.self.query"
    assert torch.equal(live[f"bert.{key}.base_layer.weight"], base[f"{key}.weight"])
    assert not torch.equal(live[f"bert.{key}.lora_B.default.weight"], torch.zeros_like(live[f"bert.{key}.lora_B.default.weight"]))


def test_reload_and_merged_export_give_identical_predictions(lora_run, tmp_path) -> None:
    from transformers import pipeline

    first = lmtune.load(lora_run.run_dir).predict(TEXTS)
    again = lmtune.load(lora_run.run_dir).predict(TEXTS)  # nothing re-initialised at random on reload
    assert first == again
    merged = export(lora_run.run_dir, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    out = pipeline("text-classification", model=str(merged), device="cpu", top_k=None)(TEXTS)
    for pred, scores in zip(first, out):
        by_label = {s["label"]: s["score"] for s in scores}
        assert set(by_label) == set(pred["scores"])
        for label, score in pred["scores"].items():
            assert by_label[label] == pytest.approx(score, abs=1e-5)


def test_cli_export(lora_run, tmp_path) -> None:
    from typer.testing import CliRunner

    from lmtune.cli import app

    result = CliRunner().invoke(app, ["export", str(lora_run.run_dir), "-o", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plain" / "config.json").is_file()
    from huggingface_hub import ModelCard

    assert ModelCard.load(tmp_path / "plain" / "README.md").data.library_name == "transformers"  # merged now
    # Nothing the user has is replaced unasked: a non-empty folder, a file, the run itself.
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    data = tmp_path / "train.csv"
    data.write_text("text,label\n")
    for target, message in ((notes, "is not empty"), (data, "is a file"), (lora_run.run_dir, "holds the run"),
                            (lora_run.run_dir.parent, "holds the run")):
        result = CliRunner().invoke(app, ["export", str(lora_run.run_dir), "-o", str(target)])
        assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output
    for inside in ("model", "new"):  # a folder inside the run, even with --overwrite: its adapter would be replaced
        result = CliRunner().invoke(app, ["export", str(lora_run.run_dir), "-o", str(lora_run.run_dir / inside),
                                          "--overwrite"])
        assert result.exit_code != 0 and "inside the run" in " ".join(result.output.split()), result.output
    assert (lora_run.run_dir / "model" / "adapter_config.json").is_file() and not (lora_run.run_dir / "new").exists()
    assert (notes / "notes.txt").read_text() == "keep me" and data.read_text() == "text,label\n"
    assert (lora_run.run_dir / "metrics.json").is_file()
    # --overwrite replaces only what an earlier export wrote: the user's own folder stays as it is.
    result = CliRunner().invoke(app, ["export", str(lora_run.run_dir), "-o", str(notes), "--overwrite"])
    assert result.exit_code != 0 and "not written by `lmtune export`" in " ".join(result.output.split())
    assert (notes / "notes.txt").read_text() == "keep me" and not (notes / "config.json").exists()
    (tmp_path / "plain" / "stale.txt").write_text("from the first export")
    result = CliRunner().invoke(app, ["export", str(lora_run.run_dir), "-o", str(tmp_path / "plain"), "--overwrite"])
    assert result.exit_code == 0 and not (tmp_path / "plain" / "stale.txt").exists()
    assert (tmp_path / "plain" / "config.json").is_file()


@pytest.mark.parametrize("variant", ["dora", "ia3", "prompt_tuning"])
def test_relatives_train_and_reload(variant, tiny_config) -> None:
    tiny_config["method"] = {"name": "lora", "variant": variant}
    tiny_config["train"]["max_steps"] = 3
    tiny_config["output"]["name"] = variant
    result = lmtune.train(tiny_config)
    assert result.metrics["stages"][variant]["trainable_params"] < result.metrics["params"]["total"]
    first = lmtune.load(result.run_dir).predict(TEXTS)
    assert first == lmtune.load(result.run_dir).predict(TEXTS)
    if variant == "prompt_tuning":  # virtual tokens added at run time: nothing to merge into the weights
        from lmtune.predict import export

        with pytest.raises(ValueError, match="holds a prompt-tuning adapter: its virtual tokens are added at run"):
            export(result.run_dir, result.run_dir.parent / "exported")


def test_reload_prints_no_missing_head_report(lora_run, caplog) -> None:
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()  # as in a Python session (the CLI silences transformers)
    try:
        with caplog.at_level(logging.WARNING, logger="transformers.modeling_utils"):
            lmtune.load(lora_run.run_dir)
        assert "MISSING" not in caplog.text  # the head comes from the adapter, not at random
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def test_qlora_is_refused_without_a_cuda_gpu_before_any_data_is_read(tiny_config: dict, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny_config["method"] = {"name": "lora", "quantize": "4bit"}
    tiny_config["data"]["train"] = "/no/such/file.csv"  # never read: the config is refused first
    with pytest.raises(ConfigError, match=r"method.quantize=4bit \(QLoRA\) needs a CUDA GPU"):
        lmtune.train(tiny_config)
    tiny_config["method"]["variant"] = "ia3"
    with pytest.raises(ConfigError, match="QLoRA trains LoRA or DoRA adapters, not method.variant=ia3"):
        lmtune.train(tiny_config)


def test_qlora_loads_the_backbone_in_4bit_nf4_with_double_quantisation_on_the_gpu() -> None:
    import torch

    from lmtune.methods.lora import Lora, LoraOptions

    assert Lora.load_kwargs(LoraOptions(), "cuda:0") == {}
    kwargs = Lora.load_kwargs(LoraOptions(quantize="4bit"), torch.device("cuda", 1))
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["device_map"] == {"": "cuda:1"}


def test_a_pickled_adapter_loads_only_when_the_caller_allows_pickles(lora_run, tmp_path) -> None:
    """A run folder is data: an adapter_model.bin instead of safetensors is refused like pickled model weights, and
    one holding more than tensors is refused by the safe loader with one line, nothing in it run."""
    import os
    import pickle
    import shutil

    import torch

    from lmtune.models import ModelError

    run = tmp_path / "handed-over"
    shutil.copytree(lora_run.run_dir, run)
    weights = load_file(str(run / "model" / "adapter_model.safetensors"))
    (run / "model" / "adapter_model.safetensors").unlink()
    torch.save(weights, run / "model" / "adapter_model.bin")
    with pytest.raises(ModelError, match="allow-pickle"):
        lmtune.load(run)
    expected = lmtune.load(lora_run.run_dir).predict(["good film"])[0]["label"]
    assert lmtune.load(run, allow_pickle=True).predict(["good film"])[0]["label"] == expected

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'code-ran'}",)

    (run / "model" / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ModelError, match="nothing in them was run"):
        lmtune.load(run, allow_pickle=True)
    assert not (tmp_path / "code-ran").exists()


def test_ia3_takes_the_given_modules_and_unused_options_are_named(tiny_config, caplog) -> None:
    """ia3 built peft's default modules whatever target_modules said, and r / alpha were dropped silently."""
    tiny_config["train"]["max_steps"] = 1

    def trainable(name: str, **method) -> int:
        tiny_config["output"]["name"] = name
        tiny_config["method"] = {"name": "lora", "variant": "ia3", **method}
        return lmtune.train(tiny_config).metrics["stages"]["ia3"]["trainable_params"]

    default = trainable("ia3")
    with caplog.at_level("WARNING", logger="lmtune"):
        query_only = trainable("ia3-query", target_modules=["query"], r=2)
    assert query_only < default
    assert "method.variant=ia3 does not use method.r=2: ignored" in caplog.text
    with pytest.raises(Exception, match=r"target_modules \['querry'\] name no module"):
        trainable("ia3-typo", target_modules=["querry"])
