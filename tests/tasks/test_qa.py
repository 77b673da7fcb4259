"""Extractive QA: readers and bad answers, windows over long contexts, spans in characters, training, predict."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lmtune
from lmtune.config import load_config
from lmtune.data import DataError
from lmtune.data.squad import read_squad
from lmtune.methods import METHODS  # importing the packages registers the built-in ones
from lmtune.tasks import TASKS


FILLER = "the film was good and the drug was bad but the pill worked very well for one week".split()
QUESTION = "what time ?"


def squad_json(version: str = "1.1") -> dict:
    return {"version": version, "data": [
        {"title": "Films", "paragraphs": [
            {"context": "the film was good. it ran for two hours.",
             "qas": [{"id": "f1", "question": "how was the film?",
                      "answers": [{"text": "good", "answer_start": 13}, {"text": "was good", "answer_start": 9}]},
                     {"id": "f2", "question": "how long?", "answers": [{"text": "two hours", "answer_start": 30}]}]}]},
        {"title": "Drugs", "paragraphs": [
            {"context": "the pill worked.", "qas": [{"id": "d1", "question": "what worked?",
                                                  "answers": [{"text": "the pill", "answer_start": 0}]}]},
            {"context": "sleep came at night.", "qas": [{"id": "d2", "question": "when?",
                                                       "answers": [{"text": "night", "answer_start": 14}]}]}]}]}


def write_json(path: Path, data: object) -> Path:
    text = json.dumps(data, ensure_ascii=False)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def digit_rows(n: int, seed: int, lo: int, hi: int) -> list[dict]:
    """Contexts of filler words holding one digit, the answer to every question: learnable in seconds."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(lo, hi))]
        at = rng.randint(0, len(words))
        digit = str(rng.randint(0, 9))
        words.insert(at, digit)
        context = " ".join(words)
        start = len(" ".join(words[:at])) + (1 if at else 0)
        rows.append({"id": f"s{seed}-{i}", "title": f"article {i % 8}", "question": QUESTION, "context": context,
                     "answers": {"text": [digit], "answer_start": [start]}})
    return rows


def make_task(**options):
    cfg = load_config({"task": {"name": "qa", **options}})
    return TASKS["qa"](cfg.task, cfg.data)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ---- readers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dev.json", "dev.json.gz"])
def test_reads_squad_v1_json(tmp_path: Path, name: str) -> None:
    ds, skipped = read_squad(write_json(tmp_path / name, squad_json()))
    assert skipped == [] and len(ds) == 4
    first = ds[0]
    assert (first["id"], first["title"], first["_row"]) == ("f1", "Films", 1)
    assert first["answer_texts"] == ["good", "was good"] and first["answer_starts"] == [13, 9]
    assert ds["title"][:] == ["Films", "Films", "Drugs", "Drugs"] and not any(ds["is_impossible"][:])


def test_reads_squad_v2_unanswerable(tmp_path: Path) -> None:
    data = squad_json("v2.0")
    data["data"][0]["paragraphs"][0]["qas"].append(
        {"id": "f3", "question": "who directed it?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "film", "answer_start": 4}]})
    path = write_json(tmp_path / "v2.json", data)
    ds, _ = read_squad(path)
    assert ds["is_impossible"][:] == [False, False, True, False, False]
    assert ds[2]["answer_texts"] == []
    with pytest.raises(DataError) as info:
        read_squad(path, allow_impossible=False)
    assert info.value.row == 3 and "version_2" in str(info.value) and "'f3'" in str(info.value)


def test_reads_flat_jsonl_in_both_answer_layouts(tmp_path: Path) -> None:
    rows = [{"id": "a", "question": "q?", "context": "abc def", "answers": {"text": ["def"], "answer_start": [4]}},
            {"id": "b", "question": "q?", "context": "abc def", "answers": {"text": [], "answer_start": []}}]
    ds, _ = read_squad(write_jsonl(tmp_path / "flat.jsonl", rows))
    assert ds["answer_texts"][:] == [["def"], []] and ds["is_impossible"][:] == [False, True]
    listed = [{"question": "q?", "context": "abc def", "answers": [{"text": "abc", "answer_start": 0}]}]
    ds, _ = read_squad(write_jsonl(tmp_path / "listed.jsonl", listed))
    assert ds[0]["answer_starts"] == [0] and ds[0]["id"] == "1"  # no id: the line number


def test_answer_not_at_its_start_names_row_field_and_id(tmp_path: Path) -> None:
    data = squad_json()
    data["data"][1]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] = 12
    with pytest.raises(DataError) as info:
        read_squad(write_json(tmp_path / "bad.json", data))
    err = info.value
    assert (err.row, err.field) == (4, "answers") and "bad.json" in str(err)
    assert "'d2'" in str(err) and "not at answer_start 12" in str(err) and "it occurs at 14" in str(err)


def test_bad_rows_skipped_by_policy_and_counted(tmp_path: Path) -> None:
    rows = digit_rows(6, seed=3, lo=3, hi=5)
    rows[2]["answers"]["answer_start"] = [999]
    rows[4]["context"] = ""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_squad(path)
    assert info.value.row == 3 and "2 bad rows" in str(info.value)
    cfg = load_config({"data": {"train": str(path), "validation_size": 0, "test_size": 0, "on_bad_rows": "skip"},
                       "task": "qa"})
    splits, report = TASKS["qa"](cfg.task, cfg.data).load_splits(seed=0)
    assert len(splits["train"]) == 4 and report["skipped_rows"]["train"] == 2
    assert "s3-2" in report["skipped_examples"][0] and "field 'context'" in report["skipped_examples"][1]


def test_flat_file_without_a_context_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no column 'context'"):
        read_squad(write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "text": "c"}]))


def test_answers_under_another_name_are_named_not_read_as_unanswerable(tmp_path: Path) -> None:
    rows = digit_rows(3, seed=5, lo=3, hi=5)
    misspelled = [{**{k: v for k, v in r.items() if k != "answers"}, "answer": r["answers"]} for r in rows]
    with pytest.raises(DataError, match="no column 'answers'.*the file has: .*'answer'"):
        read_squad(write_jsonl(tmp_path / "flat.jsonl", misspelled))
    # A v2-style file may leave answers out when it marks the unanswerable questions itself.
    impossible = [{**{k: v for k, v in r.items() if k != "answers"}, "is_impossible": True} for r in rows]
    assert read_squad(write_jsonl(tmp_path / "v2.jsonl", impossible))[0]["is_impossible"][:] == [True] * 3
    data = squad_json()
    qa = data["data"][0]["paragraphs"][0]["qas"][0]
    qa["answer"] = qa.pop("answers")
    with pytest.raises(DataError, match="field 'answers': no 'answers' \\(the question has: answer, id, question\\)"):
        read_squad(write_json(tmp_path / "nested.json", data), allow_impossible=True)


def test_split_by_title_keeps_articles_apart(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", digit_rows(80, seed=4, lo=3, hi=6))
    cfg = load_config({"data": {"train": str(path), "validation_size": 2, "test_size": 0.25, "split_by": "title"},
                       "task": "qa"})
    splits, report = TASKS["qa"](cfg.task, cfg.data).load_splits(seed=0)
    groups = report["groups"]
    assert len(groups["test"]) == 2 and len(groups["validation"]) == 2 and len(groups["train"]) == 4
    assert not set(groups["test"]) & set(groups["train"]) and not set(groups["validation"]) & set(groups["train"])
    assert sum(report["rows"].values()) == 80
    again, _ = TASKS["qa"](cfg.task, cfg.data).load_splits(seed=0)
    assert again["test"]["id"][:] == splits["test"]["id"][:]


# ---- windows and labels ------------------------------------------------------------------------------

def long_example(context_words: int, at: int, answer: str = "7") -> dict:
    words = [FILLER[i % len(FILLER)] for i in range(context_words)]
    words.insert(at, answer)
    context = " ".join(words)
    start = len(" ".join(words[:at])) + (1 if at else 0)
    return {"id": "x", "title": "", "question": QUESTION, "context": context, "answer_texts": [answer],
            "answer_starts": [start], "is_impossible": False}


def encode(task, tokenizer, rows: list[dict], max_length: int = 32):
    import datasets

    return task.encode(datasets.Dataset.from_list(rows), tokenizer, max_length)


def window_answers(features) -> list[str | None]:
    """The context text under each window's start/end labels (None where the label is CLS)."""
    out = []
    for row in features:
        s, e = row["start_positions"], row["end_positions"]
        out.append(None if s == row["cls"] == e else row["context"][row["char_starts"][s]:row["char_ends"][e]])
    return out


def test_long_context_windows_overlap_and_label_the_answer(tokenizer) -> None:
    task = make_task(doc_stride=8, max_question_length=8)
    features = encode(task, tokenizer, [long_example(60, at=45)])
    assert len(features) >= 3 and all(n <= 32 for n in features["length"][:])
    labels = window_answers(features)
    assert labels[0] is None and "7" in labels and labels.count("7") <= 2   # found only where it is
    for a, b in zip(features, list(features)[1:]):   # consecutive windows share doc_stride tokens
        shared = [s for s in a["char_starts"] if s >= 0][-8:]
        assert shared == [s for s in b["char_starts"] if s >= 0][:8]


@pytest.mark.parametrize("at", ["start", "end"])
def test_answers_at_the_edges_of_the_context(tokenizer, at: str) -> None:
    task = make_task(doc_stride=8, max_question_length=8)
    example = long_example(40, at=0 if at == "start" else 40, answer="nausea")
    assert example["answer_starts"][0] == (0 if at == "start" else len(example["context"]) - len("nausea"))
    labels = window_answers(encode(task, tokenizer, [example]))
    assert (labels[0] if at == "start" else labels[-1]) == "nausea"


@pytest.mark.parametrize("answer", ["nausea", " nausea", "nausea ", " nausea  "])
def test_whitespace_around_an_answer_is_not_labelled(tokenizer, answer: str) -> None:
    task = make_task(doc_stride=8, max_question_length=8)
    context = "the pill gave me nausea  and then sleep"
    start = context.index(answer)
    example = {"id": "x", "title": "", "question": QUESTION, "context": context, "answer_texts": [answer],
               "answer_starts": [start], "is_impossible": False}
    assert window_answers(encode(task, tokenizer, [example], max_length=64)) == ["nausea"]


def test_multibyte_characters_give_character_offsets(tokenizer) -> None:
    context = "café 東京 naïve 😀 the pill worked . then sleep"
    start = context.index("sleep")
    example = {**long_example(1, 0), "context": context, "answer_texts": ["sleep"], "answer_starts": [start]}
    task = make_task(doc_stride=4, max_question_length=8)
    features = encode(task, tokenizer, [example], max_length=16)
    assert "sleep" in window_answers(features)
    answers = task.postprocess(label_logits(features), len(features), features)
    assert answers[0]["answer"] == "sleep" and (answers[0]["start"], answers[0]["end"]) == (start, start + 5)


def label_logits(features, scale: float = 10.0):
    """Model outputs that put start/end exactly on each window's labels (CLS where the answer is absent)."""
    width = max(features["length"][:])
    starts = torch.zeros(len(features), width)
    ends = torch.zeros(len(features), width)
    for i, row in enumerate(features):
        answer_here = row["start_positions"] != row["cls"]
        starts[i, row["start_positions"]] = scale if answer_here else 1.0
        ends[i, row["end_positions"]] = scale if answer_here else 1.0
    yield list(range(len(features))), SimpleNamespace(start_logits=starts, end_logits=ends, loss=None), {}


def test_answer_in_the_third_window_found_with_synthetic_logits(tokenizer) -> None:
    task = make_task(doc_stride=8, max_question_length=8)
    examples = [long_example(70, at=50), long_example(10, at=3, answer="4")]
    features = encode(task, tokenizer, examples)
    windows = [w for w, ex in enumerate(features["example"][:]) if ex == 0]
    holding = [w for w in windows if window_answers(features.select([w]))[0] == "7"]
    assert min(holding) - windows[0] >= 2   # the answer first appears in the third window or later
    scalars, details = task.evaluate(label_logits(features), features)
    assert scalars["exact_match"] == 100.0 and scalars["f1"] == 100.0
    assert details["examples"] == 2 and details["windows"] == len(features)


def test_left_padding_tokenizers_take_the_context_first(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    task = make_task(doc_stride=8, max_question_length=8)
    features = encode(task, tokenizer, [long_example(60, at=45)])
    assert features[0]["char_starts"][1] == 0   # the context follows CLS directly
    assert "7" in window_answers(features)
    scalars, _ = task.evaluate(label_logits(features), features)
    assert scalars["exact_match"] == 100.0


def test_stride_that_leaves_no_room_is_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match="task.doc_stride=30"):
        encode(make_task(doc_stride=30, max_question_length=8), tokenizer, [long_example(60, at=45)])


def test_long_questions_are_cut_and_said_so_also_when_the_windows_come_from_the_cache(
        tokenizer, caplog, tmp_path, monkeypatch) -> None:
    from lmtune.data import store

    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path))
    example = {**long_example(20, 5), "question": " ".join(["what"] * 40)}
    features = encode(make_task(doc_stride=4, max_question_length=6), tokenizer, [example])
    assert "7" in window_answers(features) and "1 question(s) longer than" in caplog.text
    import datasets

    on_disk = store.on_disk(datasets.Dataset.from_list([example] * 2))  # as a SQuAD file is read: maps are cached
    for _ in range(2):  # the second encode reads the windows from datasets' cache
        caplog.clear()
        make_task(doc_stride=4, max_question_length=6).encode(on_disk, tokenizer, 32)
        assert "2 question(s) longer than task.max_question_length=6 tokens were cut" in caplog.text


def test_predict_inputs_are_checked() -> None:
    with pytest.raises(DataError) as info:
        make_task().from_texts([{"question": "q", "context": "c"}, {"question": "q"}])
    assert (info.value.row, info.value.field) == (2, "context")


# ---- training, predict, saved model ------------------------------------------------------------------

def qa_config(root: Path, model: Path, **overrides) -> dict:
    train = write_jsonl(root / "train.jsonl", digit_rows(160, seed=1, lo=3, hi=30))
    # Test contexts are longer than one window: the answer sits in a later window for many of them.
    test = write_jsonl(root / "test.jsonl", digit_rows(24, seed=2, lo=60, hi=110))
    cfg = {"model": {"name": str(model)},
           "data": {"train": str(train), "test": str(test), "validation_size": 1, "split_by": "title"},
           "task": {"name": "qa", "doc_stride": 16, "max_question_length": 8},
           "train": {"epochs": 5, "batch_size": 16, "lr": 5e-3, "warmup_ratio": 0.0, "log_every": 2, "seed": 7},
           "output": {"dir": str(root / "runs"), "name": "qa"}}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        cfg[section][field] = value
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir: Path) -> lmtune.RunResult:
    root = tmp_path_factory.mktemp("qa")
    return lmtune.train(qa_config(root, tiny_model_dir))


def test_training_learns_to_find_answers_in_any_window(trained) -> None:
    records = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert sum(losses[-3:]) / 3 < 0.3 * sum(losses[:3]) / 3, losses
    test = trained.metrics["test"]
    assert test["windows"] > 2 * test["examples"]   # most test contexts span several windows
    mistakes = json.loads((trained.run_dir / "mistakes.json").read_text())["test"]
    assert test["exact_match"] >= 90 and test["f1"] >= 90, mistakes
    assert all(m["f1"] < 1 and m["question"] and m["gold"] for m in mistakes)
    assert trained.metrics["selection"]["metric"] == "f1"
    data = trained.metrics["data"]
    assert data["rows"]["test"] == 24 and len(data["groups"]["validation"]) == 1


def test_predict_long_contexts_and_edges(trained) -> None:
    predictor = lmtune.load(trained.run_dir)
    long_context = " ".join(FILLER * 6) + " 3 " + " ".join(FILLER[:5])
    inputs = [{"question": QUESTION, "context": "8 the film was good"},
              (QUESTION, "the film was good 5"),
              {"question": QUESTION, "context": long_context}]
    preds = predictor.predict(inputs)
    assert [p["answer"] for p in preds] == ["8", "5", "3"]
    assert (preds[0]["start"], preds[0]["end"]) == (0, 1)
    assert (preds[1]["start"], preds[1]["end"]) == (18, 19)
    assert long_context[preds[2]["start"]:preds[2]["end"]] == "3" and preds[2]["start"] > 300
    assert all(0 < p["score"] <= 1 and p["no_answer"] is False for p in preds)
    metrics = lmtune.evaluate(trained.run_dir, load_config(trained.run_dir / "config.yaml").data.test)
    assert metrics["f1"] == pytest.approx(trained.metrics["test"]["f1"])


def test_saved_model_is_a_plain_question_answering_model(trained) -> None:
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    folder = str(trained.run_dir / "model")
    model = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context = "the drug was bad 6 and the pill worked"
    enc = tokenizer(QUESTION, context, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0]
    with torch.no_grad():
        out = model(**enc)
    context_tokens = torch.tensor([s == 1 for s in enc.sequence_ids(0)])
    start = int(out.start_logits[0].masked_fill(~context_tokens, -1e9).argmax())
    end = int(out.end_logits[0].masked_fill(~context_tokens, -1e9).argmax())
    assert context[offsets[start][0]:offsets[end][1]] == "6"


def test_pipeline_loads_the_saved_model(trained) -> None:
    import transformers.pipelines as pipelines

    if "question-answering" not in pipelines.SUPPORTED_TASKS:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no question-answering pipeline "
                    "(removed in 5.3)")
    answer = pipelines.pipeline("question-answering", model=str(trained.run_dir / "model"), device="cpu")(
        question=QUESTION, context="the drug was bad 6 and the pill worked")
    assert answer["answer"] == "6"


def test_version_2_learns_no_answer_and_reports_the_threshold(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = digit_rows(160, seed=5, lo=3, hi=20)
    for row in rows[::3]:   # a third have no digit and so no answer
        row["context"] = " ".join(w for w in row["context"].split() if not w.isdigit())
        row["answers"] = {"text": [], "answer_start": []}
    cfg = qa_config(tmp_path, tiny_model_dir)
    cfg["data"] = {"train": str(write_jsonl(tmp_path / "v2.jsonl", rows)), "validation_size": 2, "test_size": 2,
                   "split_by": "title"}
    cfg["task"]["version_2"] = True
    cfg["train"]["epochs"] = 10
    result = lmtune.train(cfg)
    m = result.metrics
    for key in ("has_answer_f1", "no_answer_f1", "best_f1", "best_f1_threshold", "best_exact_threshold"):
        assert key in m["validation"], key
    assert m["validation"]["best_f1"] >= m["validation"]["f1"] - 1e-9
    assert m["test"]["f1"] >= 80 and m["test"]["no_answer_f1"] >= 80
    preds = lmtune.load(result.run_dir).predict([(QUESTION, "the film was good"),
                                                                 (QUESTION, "the film 2 was good")])
    assert preds[0]["no_answer"] and preds[0]["answer"] == "" and preds[0]["start"] is None
    assert preds[1]["answer"] == "2"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_qa(tmp_path: Path, tiny_model_dir: Path, method: str) -> None:
    cfg = qa_config(tmp_path, tiny_model_dir)
    cfg["method"] = {"name": method}
    cfg["train"].update(max_steps=2, epochs=1)
    result = lmtune.train(cfg)
    assert result.metrics["steps"] >= 2 and "f1" in result.metrics["test"]   # max_steps is per stage
    assert lmtune.load(result.run_dir).predict([(QUESTION, "the film 2 was good")])[0]["answer"]


# ---- the benchmark split (examples/squad.yaml) --------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_written_down_squad_split_follows_from_the_rule() -> None:
    import datasets

    from lmtune.data import group_values, split_off_groups

    written = json.loads((EXAMPLES / "squad_split.json").read_text(encoding="utf-8"))
    titles = written["train"] + written["validation"] + written["test"]
    assert len(set(titles)) == 48 and len(written["test"]) == 10
    cfg = load_config(EXAMPLES / "squad.yaml")
    assert cfg.task.name == "qa" and cfg.data.split_by == "title" and cfg.train.seed == 42
    ds = datasets.Dataset.from_dict({"title": sorted(titles, reverse=True)})
    rest, test = split_off_groups(ds, int(cfg.data.test_size), cfg.train.seed, "title")
    train, validation = split_off_groups(rest, int(cfg.data.validation_size), cfg.train.seed, "title")
    assert group_values(test, "title") == written["test"]
    assert group_values(validation, "title") == written["validation"]
    assert group_values(train, "title") == written["train"]


def test_squad_example_reads_the_shared_data() -> None:
    from helpers import SHARED_DATA

    if not (SHARED_DATA / "squad_v1.1" / "dev-v1.1.json.gz").is_file():
        pytest.skip("../shared/data/squad_v1.1 is not here")
    cfg = load_config(EXAMPLES / "squad.yaml", [f"data.train={SHARED_DATA / 'squad_v1.1' / 'dev-v1.1.json.gz'}"])
    splits, report = TASKS["qa"](cfg.task, cfg.data).load_splits(cfg.train.seed)
    written = json.loads((EXAMPLES / "squad_split.json").read_text(encoding="utf-8"))
    assert report["rows"] == written["questions"] and report["skipped_rows"] == {"train": 0}
    assert report["groups"]["test"] == written["test"] and report["overlap_with_train"] == {"test": 0, "validation": 0}


def test_candidate_spans_equal_the_pair_by_pair_reading() -> None:
    """The vectorised span search gives the spans, best scores and first-met order of reading pair by pair."""
    import numpy as np

    from lmtune.tasks.qa import _candidate_spans

    def by_pairs(windows, n_best, max_len):
        spans = {}
        for start_logits, end_logits, char_starts, char_ends in windows:
            context = np.flatnonzero(char_starts >= 0)
            if not len(context):
                continue
            tops = context[np.argsort(-start_logits[context], kind="stable")[:n_best]]
            tope = context[np.argsort(-end_logits[context], kind="stable")[:n_best]]
            for a in tops:
                for b in tope:
                    if 0 <= b - a < max_len:
                        key, value = (int(char_starts[a]), int(char_ends[b])), float(start_logits[a] + end_logits[b])
                        if value > spans.get(key, -np.inf):
                            spans[key] = value
        return spans

    rng = np.random.default_rng(0)
    for trial in range(50):
        windows = []
        for w in range(rng.integers(1, 4)):  # overlapping windows of one context: shared character offsets
            n, offset = 30, 5 * w
            char_starts = np.r_[[-1] * 3, np.arange(offset, offset + n) * 4]
            logits = rng.integers(-3, 3, (2, len(char_starts))).astype(np.float32)  # many ties
            if trial % 5 == 1:  # a diverged model: NaN and -inf logits are never a best span
                logits[rng.integers(0, 2, 8), rng.integers(0, len(char_starts), 8)] = rng.choice([np.nan, -np.inf])
            windows.append((logits[0], logits[1], char_starts, char_starts + 3))
        windows.append((np.zeros(4, np.float32), np.zeros(4, np.float32), -np.ones(4, int), -np.ones(4, int)))
        got, want = _candidate_spans(windows, 5, 6), by_pairs(windows, 5, 6)
        assert list(got.items()) == list(want.items()), trial
    assert _candidate_spans([], 5, 6) == {}
    # Context but no pair that fits (every top end before every top start): no spans, as pair by pair.
    cs = np.arange(6) * 4
    start_last, end_first = np.r_[0, 0, 0, 0, 0, 9.0], np.r_[9.0, 0, 0, 0, 0, 0]
    late_starts = (start_last.astype(np.float32), end_first.astype(np.float32), cs, cs + 3)
    assert _candidate_spans([late_starts], 1, 6) == by_pairs([late_starts], 1, 6) == {}
