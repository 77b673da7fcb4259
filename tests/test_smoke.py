"""Every task x every method trains two steps on CPU, saves, and loads back for prediction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

import lmtune
from helpers import make_sentiment_rows, write_csv
from lmtune.config import ConfigError, load_config
from lmtune.preflight import check_setup
from lmtune.methods import METHODS  # importing the packages registers the built-in ones
from lmtune.tasks import TASKS



def classification_data(tmp_path: Path) -> tuple[dict, list]:
    train = write_csv(tmp_path / "train.csv", make_sentiment_rows(24, seed=1))
    return {"train": str(train), "validation_size": 0.25, "test_size": 0.25}, ["great film", {"text": "awful"}]


def regression_data(tmp_path: Path) -> tuple[dict, list]:
    rows = [{"text": t, "text_b": u, "score": str(s)} for t, u, s in
            [("a good film", "a fine film", 4.5), ("a bad drug", "a great night", 0.5)] * 12]
    train = write_csv(tmp_path / "pairs.csv", rows)
    return ({"train": str(train), "validation_size": 0.25, "test_size": 0.25, "text_pair_column": "text_b",
             "label_column": "score"}, [{"text": "good film", "text_pair": "fine film"}])


def qa_data(tmp_path: Path) -> tuple[dict, list]:
    context = "the film was good and the drug was bad but the pill worked very well for one week"
    rows = [{"id": str(i), "title": f"t{i % 4}", "question": "what was good ?", "context": context,
             "answers": {"text": ["film"], "answer_start": [4]}} for i in range(24)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return ({"train": str(train), "validation_size": 1, "test_size": 1, "split_by": "title"},
            [{"question": "what was bad ?", "context": context}])


def ner_data(tmp_path: Path) -> tuple[dict, list]:
    sentence = "the O\ndoctor B-PER\npeople I-PER\nwas O\nin O\nthe O\nnight B-LOC\n\n"
    train = tmp_path / "train.conll"
    train.write_text("-DOCSTART- O\n\n" + sentence * 24, encoding="utf-8")
    return ({"train": str(train), "validation_size": 0.25, "test_size": 0.25},
            ["the doctor was here.", {"tokens": ["a", "night"]}])


def causal_lm_data(tmp_path: Path) -> tuple[dict, list]:
    train = tmp_path / "train.txt"
    train.write_text("the film was good and i loved it\nbad drug , awful night\n" * 12, encoding="utf-8")
    return {"train": str(train), "validation_size": 4, "test_size": 4}, ["the film", {"text": "bad"}]


def instruct_data(tmp_path: Path) -> tuple[dict, list]:
    rows = [{"messages": [{"role": "user", "content": "good film"}, {"role": "assistant", "content": "positive"}]}
            for _ in range(24)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"train": str(train), "validation_size": 4, "test_size": 4}, ["good film"]


# task name -> builder of (data section, inputs for predict); a new task adds its builder here.
SMOKE_DATA: dict[str, Callable[[Path], tuple[dict, list]]] = {
    "classification": classification_data,
    "regression": regression_data,
    "qa": qa_data,
    "ner": ner_data,
    "causal_lm": causal_lm_data,
    "instruct": instruct_data,
}
DECODER_TASKS = {"causal_lm", "instruct"}  # trained on the tiny Llama, whose output layer is tied to its embeddings
# Not applicable to that model, with a clear error instead: no separate head; Llama has no biases (BitFit).
NOT_FOR_DECODER = {"head": "tied to its input embeddings", "lp_ft": "tied to its input embeddings",
                   "bitfit": "has no biases"}
TASK_OPTIONS = {"qa": {"doc_stride": 8, "max_question_length": 8}}  # windows fit the tiny model's 64 tokens
METHOD_OPTIONS = {"lora": {"r": 2}, "partial": {"layers": 1}, "lp_ft": {"probe_epochs": 1, "epochs": 1}}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_method_pair(task: str, method: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if task not in SMOKE_DATA:
        pytest.fail(f"task {task!r} has no smoke data builder in tests/test_smoke.py")
    data, inputs = SMOKE_DATA[task](tmp_path)
    model_dir = request.getfixturevalue("tiny_decoder_dir" if task in DECODER_TASKS else "tiny_model_dir")
    cfg = {"model": {"name": str(model_dir)}, "data": data, "task": {"name": task, **TASK_OPTIONS.get(task, {})},
           "method": {"name": method, **METHOD_OPTIONS.get(method, {})},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "eval_every": 1},
           "output": {"dir": str(tmp_path / "runs"), "name": f"{task}-{method}"}}
    if task in DECODER_TASKS and method in NOT_FOR_DECODER:
        with pytest.raises(ValueError, match=NOT_FOR_DECODER[method]):
            lmtune.train(cfg)
        # validate (and compare) refuse it too, from the model's structure alone: no weights loaded, no data read
        with pytest.raises(ConfigError, match=NOT_FOR_DECODER[method]):
            check_setup(load_config(cfg))
        return
    result = lmtune.train(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in records)
    # What validation reports is what the task declares (eval.metric is checked against that before training).
    config = load_config(cfg)
    assert {k.removeprefix("eval/") for r in records for k in r if k.startswith("eval/")} == \
        set(TASKS[task](config.task, config.data).metric_names)
    assert 0 < result.metrics["params"]["trainable"] <= result.metrics["params"]["total"]
    preds = lmtune.load(result.run_dir).predict(inputs)
    assert len(preds) == len(inputs)
    # The model card parses as the Hub reads it, with the test metrics in model-index form.
    from huggingface_hub import ModelCard

    card = ModelCard.load(result.run_dir / "model" / "README.md")
    assert card.data.pipeline_tag == TASKS[task].pipeline_tag and "lmtune" in card.data.tags
    assert card.data.library_name == ("peft" if method == "lora" else "transformers")
    indexed = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    for key, value in result.metrics["test"].items():
        if isinstance(value, float):
            assert indexed[("test", key)] == pytest.approx(value, abs=1e-6), key
    assert "## Training" in card.text and "## Results" in card.text and "lmtune.load" in card.text
    # The HTML report: the card's text and every test metric, and (tasks that score inputs) the worst mistakes.
    page = (result.run_dir / "report.html").read_text(encoding="utf-8")
    assert "<h3>Training</h3>" in page and all(f"<th>{key}</th>" in page for key in result.metrics["test"]
                                                if isinstance(result.metrics["test"][key], float))
    mistakes = json.loads((result.run_dir / "mistakes.json").read_text()) if task not in DECODER_TASKS else {}
    assert all(len(rows) <= 20 for rows in mistakes.values())
    if method == "lora":  # only the adapter is saved
        assert not any((result.run_dir / "model").glob("model*.safetensors"))
