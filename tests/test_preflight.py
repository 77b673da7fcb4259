"""Config problems that need the model's config.json and tokenizer: `validate` and `train` refuse them alike, early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import lmtune
from lmtune.cli import app


def qa_file(path: Path, n: int = 20) -> str:
    rows = [{"id": f"q{i}", "question": "what number ?", "context": f"the film was good {i} times",
             "answers": {"text": [str(i)], "answer_start": [18]}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def conll_file(path: Path, n: int = 20) -> str:
    path.write_text("".join("john B-PER\nsmith I-PER\nwas O\ngood O\n\n" for _ in range(n)), encoding="utf-8")
    return str(path)


def text_file(path: Path, n: int = 20) -> str:
    path.write_text("".join(f"the film was good and the drug was bad {i}\n" for i in range(n)), encoding="utf-8")
    return str(path)


def bad_config(case: str, cfg: dict, tmp_path: Path, decoder: Path) -> tuple[dict, str]:
    """`cfg` (the tiny classification config) made wrong in one way, and what the error must say."""
    if case == "qa_window":  # the default doc_stride 128 and max_question_length 64 cannot fit in 64 tokens
        cfg["task"] = {"name": "qa"}
        cfg["data"] = {"train": qa_file(tmp_path / "qa.jsonl")}
        return cfg, "task.doc_stride=128 must be smaller than the context part of a window"
    if case == "ner_stride":
        cfg["task"] = {"name": "ner", "stride": 40}
        cfg["data"] = {"train": conll_file(tmp_path / "ner.conll")}
        return cfg, "task.stride=40 must be under half of a window"
    if case == "general_text_on_a_classifier":
        cfg["eval"] = {"general_text": text_file(tmp_path / "general.txt")}
        return cfg, "eval.general_text measures a causal LM's perplexity; the classification task does not train"
    if case == "general_text_on_an_encoder":
        cfg["task"] = {"name": "causal_lm"}
        cfg["data"] = {"train": text_file(tmp_path / "train.txt")}
        cfg["eval"] = {"general_text": text_file(tmp_path / "general.txt")}
        return cfg, "is not saved as one (BertModel; an encoder?)"
    if case == "general_text_missing":
        cfg["model"] = {"name": str(decoder), "max_length": 16}
        cfg["task"] = {"name": "causal_lm"}
        cfg["data"] = {"train": text_file(tmp_path / "train.txt")}
        cfg["eval"] = {"general_text": str(tmp_path / "missing.txt")}
        return cfg, f"eval.general_text={tmp_path / 'missing.txt'}: no such file"
    if case == "label_smoothing_multi_label":
        cfg["task"] = {"name": "classification", "multi_label": True}
        cfg["train"]["label_smoothing"] = 0.1
        return cfg, "train.label_smoothing=0.1: the classification task (multi-label,"
    if case == "replay_on_a_classifier":
        cfg["data"]["replay"] = {"path": text_file(tmp_path / "general.txt")}
        return cfg, "data.replay mixes general text into a language model's training; the classification task"
    if case == "metric_typo":  # was caught only at the first evaluation, after a whole epoch
        cfg["eval"] = {"metric": "acc"}
        return cfg, "eval.metric 'acc' is not a metric of the classification task; did you mean 'accuracy'?"
    if case == "metric_of_another_task":
        cfg["task"] = {"name": "ner"}
        cfg["data"] = {"train": conll_file(tmp_path / "ner.conll")}
        cfg["eval"] = {"metric": "perplexity"}
        return cfg, ("eval.metric 'perplexity' is not a metric of the ner task (its metrics: f1, precision, recall, "
                     "token_accuracy, loss)")
    if case == "fp16_on_a_cpu":
        cfg["train"]["precision"] = "fp16"
        return cfg, "train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU"
    if case == "pickled_weights_only":
        import shutil

        folder = tmp_path / "pickled"
        shutil.copytree(cfg["model"]["name"], folder)
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # not loaded: refused by its name
        cfg["model"]["name"] = str(folder)
        return cfg, "holds only pickled weights (.bin), which can run arbitrary code"
    if case == "head_on_a_tied_decoder":  # was refused only after the weights were loaded and the data read
        cfg["model"] = {"name": str(decoder), "max_length": 16}
        cfg["task"] = {"name": "causal_lm"}
        cfg["data"] = {"train": text_file(tmp_path / "train.txt")}
        cfg["method"] = {"name": "head"}
        return cfg, "method 'head': the output layer of this LlamaForCausalLM is tied to its input embeddings"
    if case == "lora_target_typo":
        cfg["method"] = {"name": "lora", "target_modules": ["query", "vaule"]}  # peft adapted "query" alone, silently
        return cfg, ("method 'lora': method.target_modules ['vaule'] name no module of this "
                     "BertForSequenceClassification; its linear layers are named ['classifier', 'dense', 'key', "
                     "'query', 'value']")
    if case == "prompt_tuning_on_packed_rows":  # was a shape error at the first step
        cfg["model"] = {"name": str(decoder), "max_length": 16}
        cfg["task"] = {"name": "causal_lm"}
        cfg["data"] = {"train": text_file(tmp_path / "train.txt")}
        cfg["method"] = {"name": "lora", "variant": "prompt_tuning"}
        return cfg, "method.variant=prompt_tuning: causal_lm packs documents into rows, each attending only to itself"
    if case == "prompt_tuning_on_ner":  # was a batch-size error at the first step
        cfg["task"] = {"name": "ner"}
        cfg["data"] = {"train": conll_file(tmp_path / "ner.conll")}
        cfg["method"] = {"name": "lora", "variant": "prompt_tuning"}
        return cfg, "method.variant=prompt_tuning: the ner task labels every token"
    assert case == "max_length_over_positions"
    cfg["model"]["max_length"] = 128
    return cfg, "model.max_length=128 exceeds the 64 positions this model has"


CASES = ["qa_window", "ner_stride", "general_text_on_a_classifier", "general_text_on_an_encoder",
         "general_text_missing", "label_smoothing_multi_label", "max_length_over_positions", "replay_on_a_classifier",
         "metric_typo", "metric_of_another_task", "pickled_weights_only", "head_on_a_tied_decoder", "lora_target_typo",
         "prompt_tuning_on_packed_rows", "prompt_tuning_on_ner"]
CASES += [] if __import__("torch").cuda.is_available() else ["fp16_on_a_cpu"]


def flat(text: str) -> str:
    return " ".join(text.split())  # the console wraps long lines


@pytest.mark.parametrize("case", CASES)
def test_validate_and_train_refuse_alike_before_writing(case: str, tiny_config: dict, tmp_path: Path,
                                                        tiny_decoder_dir: Path) -> None:
    cfg, says = bad_config(case, tiny_config, tmp_path, tiny_decoder_dir)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 1, result.output
    assert flat(says) in flat(result.output)
    with pytest.raises(ValueError) as info:  # ConfigError or ModelError
        lmtune.train(config)
    assert flat(says) in flat(str(info.value)) and flat(str(info.value)) in flat(result.output)
    assert not Path(cfg["output"]["dir"]).exists()  # refused before the run directory was made


def test_forgetting_probe_on_a_decoder_passes_validate(tiny_config: dict, tmp_path: Path,
                                                       tiny_decoder_dir: Path) -> None:
    cfg, _ = bad_config("general_text_missing", tiny_config, tmp_path, tiny_decoder_dir)
    cfg["eval"]["general_text"] = text_file(tmp_path / "general.txt")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "config and data are valid" in result.output


def test_a_method_registered_elsewhere_is_left_to_train(tiny_config: dict, monkeypatch) -> None:
    """Methods outside lmtune may read weight values (none on the meta device): check_setup does not apply them."""
    from typing import Literal

    from pydantic import BaseModel

    from lmtune.config import load_config
    from lmtune.methods import METHODS, Method, ParamGroup, Stage
    from lmtune.preflight import check_setup

    class LargestOptions(BaseModel):
        name: Literal["largest"] = "largest"

    class Largest(Method):  # trains the matrix of the largest mean magnitude: needs the loaded values
        Options = LargestOptions

        @staticmethod
        def apply(model, info, options):
            name = max((n for n, p in model.named_parameters() if p.ndim == 2), key=lambda n: float(
                dict(model.named_parameters())[n].abs().mean().item()))
            return [Stage("largest", [ParamGroup([name])])]

    monkeypatch.setitem(METHODS, "largest", Largest)
    tiny_config["method"] = {"name": "largest"}
    tiny_config["train"]["max_steps"] = 1
    check_setup(load_config(tiny_config))
    assert lmtune.train(tiny_config).metrics["params"]["trainable"] > 0
