"""Model loading: built-in names, local folders, and refusal of pickled weights unless opted in."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmtune.config import ModelConfig
from lmtune.models import ModelError, load_model, max_length, resolve_model


def pickled_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def test_unknown_name_is_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a built-in name .* never downloaded"):
        resolve_model("bert-base-uncased")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_pickled_weights_need_opt_in(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    folder = pickled_copy(tiny_model_dir, tmp_path)
    with pytest.raises(ModelError, match="allow_pickle=true"):
        load_model(AutoModelForSequenceClassification, ModelConfig(name=str(folder)), num_labels=2)
    model, new = load_model(AutoModelForSequenceClassification, ModelConfig(name=str(folder), allow_pickle=True),
                            num_labels=2)
    assert sorted(new) == ["classifier.bias", "classifier.weight"]  # the backbone came from the .bin


def test_loads_fp32_master_weights_from_half_precision(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, BertModel

    folder = tmp_path / "half"
    shutil.copytree(tiny_model_dir, folder)
    BertModel.from_pretrained(tiny_model_dir).half().save_pretrained(folder)
    model, _ = load_model(AutoModelForSequenceClassification, ModelConfig(name=str(folder)), num_labels=2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_max_length_is_the_smallest_limit(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert max_length(ModelConfig(name=str(tiny_model_dir)), tokenizer, config) == 64
    assert max_length(ModelConfig(name=str(tiny_model_dir), max_length=32), tokenizer, config) == 32


def test_dropout_override_reaches_every_dropout_module(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    model, _ = load_model(AutoModelForSequenceClassification, ModelConfig(name=str(tiny_model_dir), dropout=0.37),
                          num_labels=3)
    probabilities = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert probabilities == {0.37}
    assert model.config.attention_probs_dropout_prob == 0.37  # SDPA attention reads it from the config
    default, _ = load_model(AutoModelForSequenceClassification, ModelConfig(name=str(tiny_model_dir)), num_labels=3)
    assert {m.p for m in default.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
