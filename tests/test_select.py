"""`lmtune select`: tiny random models whose fit differs by construction must rank accordingly."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helpers import FIXTURES, FILLER, NEGATIVE, POSITIVE
from lmtune.cli import app
from lmtune.studies.select import rank, select

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tiny_bert(folder: Path, vocab: list[str], sentiment_rows: dict[str, "torch.Tensor"] | None = None) -> str:
    """A random 2-layer BERT (same seed for all); `sentiment_rows` overwrites the embedding rows of some words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=64)
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = BertModel(config)
    with torch.no_grad():
        for word, row in (sentiment_rows or {}).items():
            model.embeddings.word_embeddings.weight[vocab.index(word)] = row
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def candidates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import torch

    root = tmp_path_factory.mktemp("candidates")
    vocab = FIXTURES.joinpath("vocab.txt").read_text().split()
    direction = torch.zeros(32)
    direction[0] = 5.0
    # aligned: positive and negative words point opposite ways, so pooled features carry the label;
    # blind: every sentiment word has the same embedding, so both classes look alike.
    aligned = {**{w: direction for w in POSITIVE}, **{w: -direction for w in NEGATIVE}}
    blind = {w: direction.roll(1) for w in POSITIVE + NEGATIVE}
    return {"aligned": _tiny_bert(root / "aligned", vocab, aligned),
            "blind": _tiny_bert(root / "blind", vocab, blind),
            "no-vocab": _tiny_bert(root / "no-vocab", SPECIALS + FILLER[:3])}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on the sentiment words."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from helpers import make_sentiment_rows

    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["text"] for r in make_sentiment_rows(200)], vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        model_max_length=64)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_ranking_follows_constructed_fit(candidates, tiny_config, tmp_path) -> None:
    missing = str(tmp_path / "no-such-model")
    order = [candidates["blind"], candidates["no-vocab"], missing, candidates["aligned"]]
    result = select(tiny_config, order, sample=60, folds=4, output=tmp_path / "sel")
    names = [r["model"] for r in result.ranking]
    assert names[0] == candidates["aligned"] and names[-1] == missing
    rows = {r["model"]: r for r in result.ranking}
    assert rows[candidates["aligned"]]["probe"]["score"] > 0.9
    assert rows[candidates["blind"]]["probe"]["score"] < 0.75
    assert rows[candidates["aligned"]]["probe"]["folds"] == 4 and rows[candidates["aligned"]]["probe"]["examples"] == 60
    assert "neither a built-in name" in rows[missing]["error"]
    # The vocab that lacks most words has by far the most unknown tokens and ranks last on tokenizer fit alone.
    assert rows[candidates["no-vocab"]]["unk_rate"] > 0.5 > 0.01 > rows[candidates["aligned"]]["unk_rate"]
    by_tokenizer = rank([{**r, "probe": {}} for r in result.ranking if "error" not in r])
    assert by_tokenizer[-1]["model"] == candidates["no-vocab"]
    assert result.winner == candidates["aligned"]
    assert result.recommendation.startswith(f"{candidates['aligned']} fits this data best: probe accuracy")
    saved = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert saved["winner"] == result.winner and [r["rank"] for r in saved["ranking"]] == [1, 2, 3, 4]
    assert saved["sample"]["train"] == 60 and "tokenizer fit" in saved["rule"]
    assert all(r["params"] > 0 and r["seconds_per_1k"] > 0 for r in saved["ranking"] if "error" not in r)


def test_probe_takes_the_best_layer(candidates, tiny_config, tmp_path) -> None:
    """A model whose top layer erases what its first layer knows is judged by the first layer."""
    import shutil

    import torch
    from transformers import BertModel

    from lmtune.evaluation.probe import probe_layers

    assert probe_layers(2) == [1, 2] and probe_layers(6) == [2, 3, 4, 6] and probe_layers(30) == [8, 15, 22, 30]
    folder = tmp_path / "top-erased"
    shutil.copytree(candidates["aligned"], folder)
    model = BertModel.from_pretrained(folder)
    with torch.no_grad():  # the top block's output norm maps everything to zero
        model.encoder.layer[-1].output.LayerNorm.weight.zero_()
        model.encoder.layer[-1].output.LayerNorm.bias.zero_()
    model.save_pretrained(folder)
    result = select(tiny_config, [str(folder)], sample=60, folds=4, output=tmp_path / "sel")
    probe = result.ranking[0]["probe"]
    assert probe["layer"] == 1 and probe["score"] > 0.9 and probe["layers"]["2"] < 0.75


def test_causal_lm_gets_perplexity_through_the_cli(candidates, tiny_llama, tiny_config, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["select", str(config), "-c", f"{tiny_llama},{candidates['aligned']}",
                                      "--sample", "40", "--folds", "3", "-o", str(tmp_path / "sel")])
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in json.loads((tmp_path / "sel" / "select.json").read_text())["ranking"]}
    llama, bert = rows[tiny_llama], rows[candidates["aligned"]]
    assert llama["byte_level"] and llama["unk_rate"] == 0 and llama["fertility"] > bert["fertility"]
    assert 30 < llama["perplexity"] < 3000 and llama["word_perplexity"] > llama["perplexity"]
    assert "perplexity" not in bert and 0 <= llama["probe"]["score"] <= 1
    assert "fits this data best" in result.output
    assert "perplexity/word" in result.output  # off a terminal the table is not squeezed into 80 columns
    # Per word of what the model scored: a short limit that cuts most words does not flatter the candidate.
    short = select(tiny_config, [tiny_llama], ["model.max_length=8"], sample=40, folds=3, output=tmp_path / "short")
    assert short.ranking[0]["truncated"] > 0.5
    assert math.log(short.ranking[0]["word_perplexity"]) > 0.6 * math.log(llama["word_perplexity"])


def test_ner_probe_on_word_features(candidates, tiny_llama, tmp_path) -> None:
    rng = random.Random(0)
    lines = []
    for _ in range(60):
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE, 1)
        rng.shuffle(words)
        lines.append(json.dumps({"tokens": words, "tags": ["B-GOOD" if w in POSITIVE else "O" for w in words]}))
    (tmp_path / "ner.jsonl").write_text("\n".join(lines) + "\n")
    config = {"model": {"name": candidates["blind"]}, "task": {"name": "ner"},
              "data": {"train": str(tmp_path / "ner.jsonl")}, "output": {"dir": str(tmp_path / "runs")}}
    result = select(config, [candidates["no-vocab"], tiny_llama, candidates["aligned"]], sample=40, folds=3)
    rows = {r["model"]: r for r in result.ranking}
    probe = rows[candidates["aligned"]]["probe"]
    assert probe["metric"] == "entity-tag macro-F1" and probe["score"] > 0.9 and probe["words"] == 40 * 5
    assert rows[candidates["no-vocab"]]["probe"]["score"] < probe["score"]
    assert rows[tiny_llama]["probe"]["words"] == 200 and "perplexity" in rows[tiny_llama]
    assert result.ranking[-1]["model"] == candidates["no-vocab"]
    assert (tmp_path / "runs" / "run-select" / "select.json").is_file()


def test_then_train_trains_the_winner(candidates, tiny_config, tmp_path) -> None:
    tiny_config["train"].update(epochs=1, max_steps=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["select", str(config), "train.seed=3", "-c",
                                      f"{candidates['no-vocab']},{candidates['aligned']}", "--sample", "40",
                                      "--folds", "2", "-o", str(tmp_path / "sel"), "--then-train"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((Path(tiny_config["output"]["dir"]) / "tiny" / "metrics.json").read_text())
    assert metrics["model"] == candidates["aligned"] and metrics["steps"] == 2
    assert "accuracy" in result.output and "run directory" in result.output


def test_probe_needs_two_examples_per_class() -> None:
    import numpy as np

    from lmtune.evaluation.probe import probe_classification

    assert "error" in probe_classification(np.zeros((3, 2)), np.array([0, 0, 1]), 5, 0)
    result = probe_classification(np.array([[0.0], [0.1], [0.2], [1.0], [1.1], [1.2]]), np.array([0, 0, 0, 1, 1, 1]),
                                  5, 0)
    assert result["folds"] == 3 and result["score"] == 1.0
    # a class of one row (kept by the stratified sample) is left out, not the end of the probe
    one = probe_classification(np.array([[0.0], [0.1], [0.2], [1.0], [1.1], [1.2], [5.0]]),
                               np.array([0, 0, 0, 1, 1, 1, 2]), 5, 0)
    assert one["score"] == 1.0 and one["dropped_classes"] == [2] and one["examples"] == 6


def test_ner_probe_with_entities_in_one_sentence_is_an_error_not_a_failure() -> None:
    import numpy as np

    from lmtune.evaluation.probe import probe_ner

    features = [np.random.default_rng(i).normal(size=(3, 4)) for i in range(30)]
    tags = [[0, 0, 0] for _ in range(30)]
    tags[4] = [1, 2, 0]  # one sentence holds every entity: no training fold could learn a second tag
    assert "error" in probe_ner(features, tags, outside=0, folds=5)
    tags[9] = [0, 1, 0]
    result = probe_ner(features, tags, outside=0, folds=5)  # two such sentences: two folds, each trainable
    assert result["folds"] == 2 and result["words"] == 90


@pytest.mark.slow
def test_minilm_beats_a_random_model(candidates, tiny_config, tmp_path) -> None:
    from lmtune.models import ModelError, resolve_model

    try:
        resolve_model("minilm-l6")
    except ModelError:
        pytest.skip("built-in minilm-l6 not installed")
    tiny_config["data"]["train"] = tiny_config["data"]["test"]  # 32 fresh rows: harder than the training file
    result = select(tiny_config, [candidates["blind"], "minilm-l6"], sample=32, folds=4, output=tmp_path / "sel")
    assert result.winner == "minilm-l6"


def test_candidate_judged_at_its_own_length_limit(candidates, tiny_config, tmp_path) -> None:
    """A max_length written for a bigger model does not fail a candidate with fewer positions."""
    tiny_config["model"]["max_length"] = 128  # the tiny models have 64 positions
    result = select(tiny_config, [candidates["aligned"]], sample=24, folds=2, output=tmp_path / "sel")
    row = result.ranking[0]
    assert "error" not in row and row["max_length"] == 64


def test_regression_probe_ranks_by_spearman(candidates, tmp_path) -> None:
    """A score that counts sentiment words: the candidate whose embeddings carry sentiment ranks first, by a ridge
    probe's Spearman correlation."""
    from helpers import write_csv

    rng = random.Random(5)
    rows = []
    for _ in range(80):
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        words = rng.sample(POSITIVE, good) + rng.sample(NEGATIVE, bad) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": str(good - bad)})
    cfg = {"model": {"name": candidates["aligned"]}, "data": {"train": str(write_csv(tmp_path / "r.csv", rows)),
                                                             "label_column": "score"},
           "task": {"name": "regression"}}
    result = select(cfg, [candidates["blind"], candidates["aligned"]], sample=80, folds=4, output=tmp_path / "sel")
    best, other = result.ranking
    assert best["model"] == candidates["aligned"] and best["probe"]["metric"] == "spearman"
    assert best["probe"]["score"] > 0.5 > other["probe"]["score"], result.ranking
    assert "probe spearman" in result.recommendation
