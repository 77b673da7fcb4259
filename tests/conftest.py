"""Shared fixtures: a tiny random BERT with a committed vocab, and small synthetic sentiment files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import FIXTURES, make_sentiment_rows, make_tiny_decoder, write_csv

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) and its WordPiece tokenizer, saved as an HF folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = BertTokenizer(vocab=str(FIXTURES / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def sentiment_files(tmp_path: Path) -> dict[str, Path]:
    return {"train": write_csv(tmp_path / "train.csv", make_sentiment_rows(96, seed=1)),
            "test": write_csv(tmp_path / "test.csv", make_sentiment_rows(32, seed=2))}


@pytest.fixture
def tiny_config(tiny_model_dir: Path, sentiment_files: dict[str, Path], tmp_path: Path) -> dict:
    """A config that trains the tiny model for a few seconds on the synthetic sentiment data."""
    return {
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(sentiment_files["train"]), "test": str(sentiment_files["test"]),
                 "validation_size": 0.25},
        "task": {"name": "classification"},
        "method": {"name": "full"},
        "train": {"epochs": 3, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0.0, "log_every": 2, "seed": 7},
        "output": {"dir": str(tmp_path / "runs"), "name": "tiny"},
    }


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama (tied embeddings, like SmolLM2) with a ChatML chat template."""
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"))
