"""`lmtune inspect`: the data profile checked against hand counts on a small file."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from helpers import write_csv
from lmtune.cli import app

TRAIN = [("good film", "positive"), ("bad zzz film", "negative"), ("good film", "positive"),
         ("the movie was very very very bad", "negative")]
VALIDATION = [("good film", "positive"), ("awful qqq", "negative")]
TEST = [("great films", "positive"), ("worst film", "negative")]


@pytest.fixture
def inspect_config(tiny_model_dir, tmp_path):
    files = {name: write_csv(tmp_path / f"{name}.csv", [{"text": t, "label": y} for t, y in rows])
             for name, rows in (("train", TRAIN), ("validation", VALIDATION), ("test", TEST))}
    config = {"model": {"name": str(tiny_model_dir), "max_length": 8},
              "data": {k: str(v) for k, v in files.items()}, "task": {"name": "classification"},
              "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_inspect_matches_hand_counts(inspect_config, tmp_path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(inspect_config)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "small-inspect"
    profile = json.loads((folder / "inspect.json").read_text())
    assert (folder / "length_distribution.png").read_bytes()[:4] == b"\x89PNG"
    train, validation, test = (profile["splits"][s] for s in ("train", "validation", "test"))
    assert profile["max_length"] == 8 and not profile["byte_level"]
    assert [s["rows"] for s in (train, validation, test)] == [4, 2, 2]
    # words 2, 3, 2, 7; tokens + [CLS] [SEP]: 4, 5, 4, 9 -> one of four over 8
    assert train["words"] == {"p50": 2.5, "p90": pytest.approx(5.8), "p99": pytest.approx(6.88), "max": 7.0,
                              "mean": 3.5}
    assert train["tokens"]["max"] == 9 and train["tokens"]["p50"] == 4.5
    assert train["truncated_rows"] == 1 and train["truncated"] == 0.25
    assert train["unk_rate"] == pytest.approx(1 / 14) and train["fertility"] == 1.0
    assert validation["unk_rate"] == 0.25
    assert test["fertility"] == 1.25 and test["unk_rate"] == 0  # films -> film ##s
    assert profile["labels"]["train"] == {"positive": 2, "negative": 2}
    dups = profile["duplicates"]
    assert dups["within"]["train"] == {"rows": 1, "texts": 1, "examples": [{"text": "good film", "count": 2}]}
    assert dups["within"]["validation"]["rows"] == 0
    assert dups["across"]["train/validation"] == {"texts": 1, "rows": 1, "examples": ["good film"]}
    assert dups["across"]["train/test"]["texts"] == 0
    assert "over max" in result.output and "25.0% (1)" in result.output


def test_profile_of_ner_and_pairs(tiny_model_dir) -> None:
    import datasets
    from transformers import AutoTokenizer

    from lmtune.studies.inspect import profile

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ner = datasets.Dataset.from_dict({"tokens": [["good", "film"], ["bad", "films", "."]],
                                      "tags": [["B-X", "O"], ["B-Y", "I-Y", "O"]]})
    result, lengths = profile({"train": ner}, tokenizer, 64)
    assert result["label_kind"] == "entity" and result["labels"]["train"] == {"X": 1, "Y": 1}
    assert result["splits"]["train"]["fertility"] == pytest.approx(6 / 5)
    assert lengths["train"].tolist() == [4, 6]
    pairs = datasets.Dataset.from_dict({"text": ["good film"], "text_pair": ["bad"], "labels": [["a"]]})
    result, lengths = profile({"train": pairs}, tokenizer, 64)
    assert lengths["train"].tolist() == [6]  # [CLS] good film [SEP] bad [SEP]
    assert result["duplicates"]["within"]["train"]["rows"] == 0


def test_profile_of_chats_counts_every_turn(tiny_model_dir) -> None:
    import datasets
    from transformers import AutoTokenizer

    from lmtune.studies.inspect import profile, segments

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = datasets.Dataset.from_dict({
        "messages": [[{"role": "user", "content": "good film"}, {"role": "assistant", "content": "positive"}], None],
        "replay_text": [None, "bad film ."]})
    assert segments(chats) == [("good film\npositive",), ("bad film .",)]
    result, lengths = profile({"train": chats}, tokenizer, 64)
    assert result["label_kind"] == "none" and result["labels"]["train"] == {}
    assert lengths["train"].tolist() == [5, 5]  # [CLS] good film positive [SEP]; [CLS] bad film . [SEP]


@pytest.mark.parametrize("task", ["causal_lm", "instruct"])
def test_replay_documents_are_a_split_of_their_own(task, tiny_decoder_dir, tmp_path) -> None:
    from lmtune.config import load_config
    from lmtune.studies.inspect import load_data

    (tmp_path / "general.txt").write_text("".join(f"general text number {i}\n" for i in range(5)))
    if task == "causal_lm":
        (tmp_path / "train.txt").write_text("".join(f"a review of film {i}\n" for i in range(3)))
        train = str(tmp_path / "train.txt")
    else:
        train = str(write_csv(tmp_path / "train.csv", [{"instruction": f"film {i}?", "output": "good"}
                                                        for i in range(3)]))
    cfg = load_config({"model": {"name": str(tiny_decoder_dir)}, "task": {"name": task},
                       "data": {"train": train, "validation_size": 0,
                                "replay": {"path": str(tmp_path / "general.txt")}}})
    _, splits = load_data(cfg)
    assert len(splits["replay"]) == 5  # the training rows held these too
    assert sum(len(rows) for name, rows in splits.items() if name != "replay") == 3


def test_data_text_is_printed_as_text_never_as_markup(tiny_model_dir, tmp_path) -> None:
    """A review quoting forum markup ([/quote], [/]) and a label in brackets: printed as written, no crash."""
    rows = [{"text": "good [/] film [/quote]", "label": "[pos]"}, {"text": "good [/] film [/quote]", "label": "[pos]"},
            {"text": "bad film", "label": "neg"}, {"text": "awful [b]film[/b]", "label": "neg"}]
    config = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(write_csv(tmp_path / "t.csv", rows)),
                                                               "validation_size": 0, "test_size": 0},
              "task": {"name": "classification"}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "brackets.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in (["inspect", str(path)], ["validate", str(path)]):
        result = CliRunner().invoke(app, command, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "[pos]" in result.output, result.output
    assert "good [/] film [/quote]" in CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"}).output
