"""A saved run is data: its config.yaml can never let its model folder run code or unpickle weights; only the
person loading it can (--trust-remote-code / --allow-pickle, lmtune.load keyword arguments)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmtune.cli import app
from lmtune.models import ModelError

from helpers import FIXTURES


def crafted_run(root: Path, model_type: str = "bert") -> Path:
    """A run folder as someone else might hand it over: its config turns both permissions on, its model's
    config.json points at a Python file beside it that leaves a trace when it runs."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    run, model = root / "their-run", root / "their-run" / "model"
    model.mkdir(parents=True)
    BertTokenizer(vocab=str(FIXTURES / "vocab.txt")).save_pretrained(model)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len((FIXTURES / "vocab.txt").read_text().split()), hidden_size=32,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).save_pretrained(model)
    raw = json.loads((model / "config.json").read_text())
    raw.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForSequenceClassification": "evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(raw))
    trace = root / "code-ran"
    (model / "evil.py").write_text(
        f"open({str(trace)!r}, 'w').write('the run folder ran its code')\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        f"class EvilConfig(BertConfig):\n    model_type = {model_type!r}\n"
        "class EvilModel(BertForSequenceClassification):\n    config_class = EvilConfig\n")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(model), "trust_remote_code": True, "allow_pickle": True},
        "task": {"name": "classification"}, "method": {"name": "full"}}))
    return run


def _predict(run: Path, *flags: str, env_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(env_home / "modules"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lmtune.cli", "predict", str(run), *flags], input="good film\n",
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_a_run_folder_cannot_switch_on_its_own_code(tmp_path: Path) -> None:
    run = crafted_run(tmp_path)  # a known model type: loads as plain BERT, the file never runs
    said = _predict(run, env_home=tmp_path)
    assert said.returncode == 0 and json.loads(said.stdout)["label"] in ("negative", "positive"), said.stderr
    assert not (tmp_path / "code-ran").exists()
    said = _predict(run, "--trust-remote-code", env_home=tmp_path)  # the caller's word: then it runs
    assert said.returncode == 0, said.stderr
    assert (tmp_path / "code-ran").is_file()


def test_a_model_that_needs_its_own_code_is_refused_with_the_flag_named(tmp_path: Path) -> None:
    import lmtune

    run = crafted_run(tmp_path, model_type="evilbert")
    with pytest.raises(ModelError, match="--trust-remote-code on predict, eval and export"):
        lmtune.load(run)
    result = CliRunner().invoke(app, ["predict", str(run)], input="good film\n")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "a saved run's config.yaml never allows it" in " ".join(result.output.split())
    assert not (tmp_path / "code-ran").exists()


def test_a_run_folder_cannot_allow_its_own_pickles(tmp_path: Path) -> None:
    import lmtune
    from safetensors.torch import load_file

    run = crafted_run(tmp_path)
    model = run / "model"
    import torch

    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    for command in (["predict", str(run)], ["eval", str(run), "--data", str(tmp_path / "x.csv")],
                    ["export", str(run), "-o", str(tmp_path / "out")]):
        result = CliRunner().invoke(app, command, input="good film\n")
        assert result.exit_code == 1 and "--allow-pickle on predict, eval and export" in " ".join(result.output.split())
    assert lmtune.load(run, allow_pickle=True).predict(["good film"])[0]["label"] in ("negative", "positive")
