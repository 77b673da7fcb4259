"""Classification data: bad input named by file/row/field, skip policy, splits, multi-label and pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmtune
from lmtune.config import ConfigError, load_config
from lmtune.data import DataError
from lmtune.registry import TASKS


def task_for(cfg: dict, labels: list[str] | None = None):
    config = load_config(cfg)
    return TASKS["classification"](config.task, config.data, labels=labels)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def data_error(cfg: dict) -> DataError:
    with pytest.raises(DataError) as info:
        task_for(cfg).load_splits(seed=0)
    return info.value


@pytest.fixture
def cfg(tmp_path: Path) -> dict:
    rows = "text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(10))
    return {"data": {"train": str(write(tmp_path / "train.csv", rows)), "test_size": 0, "validation_size": 0.2}}


def test_missing_file(cfg: dict, tmp_path: Path) -> None:
    cfg["data"]["train"] = str(tmp_path / "nope.csv")
    err = data_error(cfg)
    assert "nope.csv" in str(err) and "not found" in str(err).lower()


def test_missing_column_suggests_nearest(cfg: dict) -> None:
    cfg["data"]["text_column"] = "txt"
    err = data_error(cfg)
    assert err.field == "txt" and "'text'" in str(err) and "train.csv" in str(err)


def test_empty_text_names_row_and_field(cfg: dict, tmp_path: Path) -> None:
    cfg["data"]["train"] = str(write(tmp_path / "t.csv", "text,label\ngood,pos\n,neg\n   ,pos\nbad,neg\n"))
    err = data_error(cfg)
    assert (err.row, err.field) == (2, "text") and "empty text" in str(err) and "t.csv" in str(err)
    assert "2 bad rows" in str(err)


def test_missing_label(cfg: dict, tmp_path: Path) -> None:
    cfg["data"]["train"] = str(write(tmp_path / "t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n'))
    err = data_error(cfg)
    assert (err.row, err.field) == (2, "label") and "missing label" in str(err)


def test_unknown_label_in_test_file(cfg: dict, tmp_path: Path) -> None:
    cfg["data"]["test"] = str(write(tmp_path / "test.csv", "text,label\ngreat,pos\nmeh,neutral\n"))
    err = data_error(cfg)
    assert "test.csv" in str(err) and err.row == 2 and "unknown label 'neutral'" in str(err)


def test_unknown_label_against_given_labels(cfg: dict) -> None:
    cfg["data"]["labels"] = ["pos", "other"]
    err = data_error(cfg)
    assert "unknown label 'neg'" in str(err) and err.row == 2


def test_undecodable_bytes_name_the_line(cfg: dict, tmp_path: Path) -> None:
    cfg["data"]["train"] = str(write(tmp_path / "t.csv", b"text,label\ngood,pos\nbad \xff\xfe,neg\n"))
    err = data_error(cfg)
    assert "t.csv" in str(err) and err.row == 3


def test_empty_dataset(cfg: dict, tmp_path: Path) -> None:
    cfg["data"]["train"] = str(write(tmp_path / "t.csv", "text,label\n"))
    assert "no rows" in str(data_error(cfg))


def test_skip_policy_drops_and_counts(cfg: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = "text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(10)) + ",pos\nok,\n"
    cfg["data"].update(train=str(write(tmp_path / "t.csv", rows)), on_bad_rows="skip")
    splits, report = task_for(cfg).load_splits(seed=0)
    assert report["skipped_rows"] == {"train": 2}
    assert len(splits["train"]) + len(splits["validation"]) == 20
    assert any("row 21" in m and "empty text" in m for m in report["skipped_examples"])
    cfg.update(model={"name": str(tiny_model_dir)}, train={"max_steps": 1},
               output={"dir": str(tmp_path / "runs"), "name": "skip"})
    metrics = lmtune.train(cfg).metrics
    assert metrics["data"]["skipped_rows"] == {"train": 2}


def test_malformed_line_is_located_or_skipped_and_counted(cfg: dict, tmp_path: Path) -> None:
    rows = "text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(10))
    cfg["data"]["train"] = str(write(tmp_path / "t.csv", rows + "fine, really,pos\n,pos\n"))
    err = data_error(cfg)
    assert (err.row, err.unit) == (22, "line")
    assert "t.csv, line 22: 3 fields where the header has 2" in str(err) and "data.on_bad_rows=skip" in str(err)
    cfg["data"]["on_bad_rows"] = "skip"
    splits, report = task_for(cfg).load_splits(seed=0)
    assert report["skipped_rows"] == {"train": 2}  # the malformed line and the empty text after it
    assert len(splits["train"]) + len(splits["validation"]) == 20
    assert report["skipped_examples"][0].endswith("t.csv, line 22: 3 fields where the header has 2; "
                                                  "is a ',' inside a field not quoted?")
    assert "row 22, field 'text': empty text" in report["skipped_examples"][1]


def test_stratified_splits_and_subset(tmp_path: Path) -> None:
    rows = "text,label\n" + "".join(f"text {i},{'a' if i % 4 else 'b'}\n" for i in range(400))
    cfg = {"data": {"train": str(write(tmp_path / "t.csv", rows)), "validation_size": 0.25, "test_size": 0.1,
                    "max_train_samples": 100}}
    splits, report = task_for(cfg).load_splits(seed=3)
    assert report["rows"] == {"test": 40, "validation": 90, "train": 100}
    for name, ds in splits.items():
        share_b = ds["labels"][:].count(["b"]) / len(ds)
        assert abs(share_b - 0.25) < 0.03, name
    again, _ = task_for(cfg).load_splits(seed=3)
    assert again["validation"]["text"][:] == splits["validation"]["text"][:]


def test_overlap_between_train_and_test_is_counted(cfg: dict, tmp_path: Path, caplog) -> None:
    cfg["data"]["test"] = str(write(tmp_path / "test.csv", "text,label\ngood film 1,pos\nnew text,neg\n"))
    _, report = task_for(cfg).load_splits(seed=0)
    assert report["overlap_with_train"]["test"] == 1
    assert "1 of 2 test texts also occur in the training data" in caplog.text


def test_html_unescape_and_numeric_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "t.tsv", 'review\trating\n"I didn&#039;t like it"\t1\n"fine"\t10\n"ok"\t2\n')
    cfg = {"data": {"train": str(path), "text_column": "review", "label_column": "rating",
                    "unescape_html": True, "validation_size": 0, "test_size": 0}}
    task = task_for(cfg)
    splits, _ = task.load_splits(seed=0)
    assert "I didn't like it" in splits["train"]["text"][:]
    assert task.labels == ["1", "2", "10"]  # numeric order, not string order


def test_multi_label_trains_and_predicts_sets(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"text": f"great film {i}", "labels": ["pos", "film"]} if i % 2 else
            {"text": f"awful drug {i}", "labels": ["neg"]} for i in range(64)]
    path = write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(path), "label_column": "labels", "validation_size": 0.25, "test_size": 0},
           "task": {"name": "classification", "multi_label": True},
           "train": {"epochs": 6, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0},
           "output": {"dir": str(tmp_path / "runs"), "name": "ml"}}
    result = lmtune.train(cfg)
    assert result.metrics["selection"]["metric"] == "micro_f1"
    assert result.metrics["validation"]["micro_f1"] > 0.9
    preds = lmtune.load(result.run_dir).predict(["great film", "awful drug"])
    assert sorted(preds[0]["labels"]) == ["film", "pos"] and preds[1]["labels"] == ["neg"]


def test_multi_label_empty_set_is_a_target_not_a_missing_label(tmp_path: Path) -> None:
    rows = [{"text": "fine", "labels": []}, {"text": "awful", "labels": ["neg", "toxic"]}, {"text": "meh"}]
    path = write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"data": {"train": str(path), "label_column": "labels", "validation_size": 0, "test_size": 0,
                    "on_bad_rows": "skip"}, "task": {"name": "classification", "multi_label": True}}
    task = task_for(cfg)
    splits, report = task.load_splits(seed=0)
    assert splits["train"]["labels"][:] == [[], ["neg", "toxic"]]  # the row without the field is still missing
    assert report["skipped_rows"]["train"] == 1


def test_macro_f1_averages_the_classes_present(cfg: dict) -> None:
    from types import SimpleNamespace

    import datasets
    import torch

    task = task_for(cfg, labels=["neg", "neu", "pos"])
    gold = [0, 2, 0, 2]  # no neutral row, none predicted: not a 0 in the mean
    logits = torch.nn.functional.one_hot(torch.tensor(gold), 3).float()
    features = datasets.Dataset.from_dict({"labels": gold})
    scalars, details = task.evaluate([(list(range(4)), SimpleNamespace(logits=logits), {})], features)
    assert scalars["accuracy"] == scalars["macro_f1"] == 1.0
    assert details["per_class"]["neu"]["support"] == 0


def test_pair_model_needs_the_second_text_to_predict(tmp_path: Path) -> None:
    cfg = {"data": {"train": str(write(tmp_path / "p.csv", "a,b,label\nx,y,same\n")), "text_column": "a",
                    "text_pair_column": "b"}}
    task = task_for(cfg, labels=["same", "different"])
    assert task.from_texts([{"text": "x", "text_pair": "y"}])["text_pair"][:] == ["y"]
    for bad in ({"text": "x"}, {"text": "x", "text_pair": None}, "just one text"):
        with pytest.raises(DataError, match="no `text_pair`"):
            task.from_texts([{"text": "a", "text_pair": "b"}, bad])


def test_sentence_pairs_reach_the_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The label depends only on whether the two texts agree, so the pair must reach the model.
    rows = "premise,hypothesis,label\n" + "".join(
        f"good film,{'good' if i % 2 else 'bad'} film,{'same' if i % 2 else 'different'}\n" for i in range(64))
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(write(tmp_path / "p.csv", rows)), "text_column": "premise",
                    "text_pair_column": "hypothesis", "validation_size": 0.25, "test_size": 0},
           "train": {"epochs": 6, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0},
           "output": {"dir": str(tmp_path / "runs"), "name": "pairs"}}
    result = lmtune.train(cfg)
    assert result.metrics["validation"]["accuracy"] == 1.0
    preds = lmtune.load(result.run_dir).predict([{"text": "bad film", "text_pair": "bad film"}])
    assert preds[0]["label"] in ("same", "different")


def test_label_map_renames_raw_values(tmp_path: Path) -> None:
    path = write(tmp_path / "t.tsv", "sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\n")
    cfg = {"data": {"train": str(path), "text_column": "sentence", "label_map": {0: "negative", 1: "positive"},
                    "validation_size": 0, "test_size": 0}}
    task = task_for(cfg)
    splits, _ = task.load_splits(seed=0)
    assert task.labels == ["negative", "positive"]
    assert splits["train"]["labels"][:] == [["positive"], ["negative"], ["positive"]]


def test_label_map_that_renames_nothing_is_refused(tmp_path: Path, caplog) -> None:
    # JSON turns a column with one 1.0 into floats: 1.0 and 0.0 still meet the map's 1 and 0 (and a test file's 1).
    rows = "".join(f'{{"text": "t{i}", "label": {v}}}\n' for i, v in enumerate([1, 0, 1.0]))
    path = write(tmp_path / "t.jsonl", rows)
    cfg = {"data": {"train": str(path), "label_map": {0: "negative", 1: "positive"}, "validation_size": 0,
                    "test_size": 0}}
    task = task_for(cfg)
    splits, _ = task.load_splits(seed=0)
    assert task.labels == ["negative", "positive"] and splits["train"]["labels"][:][2] == ["positive"]
    # YAML reads `yes:` as True: the map's keys are then no label of the file.
    path = write(tmp_path / "y.csv", "text,label\ngood,yes\nbad,no\n")
    cfg = {"data": {"train": str(path), "label_map": {True: "positive", False: "negative"}, "validation_size": 0,
                    "test_size": 0}}
    error = data_error(cfg)
    assert "no key of data.label_map (False, True) is a label of this file (its labels: no, yes)" in str(error)
    assert "quote such keys" in str(error) and error.field == "label"
    cfg["data"]["label_map"] = {"yes": "positive"}  # partly covered: the rest kept, with a warning
    with caplog.at_level("WARNING", logger="lmtune"):
        task = task_for(cfg)
        task.load_splits(seed=0)
    assert task.labels == ["no", "positive"] and "not in data.label_map, kept as they are: no" in caplog.text
    cfg["data"]["label_map"] = {"no": "negative", "yes": "positive"}  # a file already holding the names is fine
    write(tmp_path / "y.csv", "text,label\ngood,positive\nbad,negative\n")
    assert task_for(cfg).load_splits(seed=0)[0]["train"]["labels"][:] == [["positive"], ["negative"]]


def test_a_list_label_asks_for_multi_label(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": ["pos"]}\n')
    error = data_error({"data": {"train": str(path), "validation_size": 0, "test_size": 0}})
    assert error.row == 2 and "a list of labels; set task.multi_label=true" in str(error)
    path = write(tmp_path / "o.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": {"a": 1}}\n')
    error = data_error({"data": {"train": str(path), "validation_size": 0, "test_size": 0}})
    assert error.row == 2 and "got an object" in str(error)  # not a class named "{'a': 1}"


def test_split_by_keeps_groups_out_of_training(tmp_path: Path) -> None:
    rows = "text,label,author\n" + "".join(f"good film {i},pos,a{i % 5}\nbad film {i},neg,a{i % 5}\n" for i in range(20))
    cfg = {"data": {"train": str(write(tmp_path / "t.csv", rows)), "test_size": 1, "validation_size": 0.25,
                    "split_by": "author"}}
    splits, report = task_for(cfg).load_splits(seed=0)
    authors = {name: set(ds["author"][:]) for name, ds in splits.items()}
    assert report["groups"] == {name: sorted(a) for name, a in authors.items()}  # listed in metrics.json
    assert len(authors["test"]) == 1 and len(authors["validation"]) == 1 and len(authors["train"]) == 3
    assert not authors["train"] & (authors["test"] | authors["validation"])
    assert len(splits["test"]) == 8 and sum(len(ds) for ds in splits.values()) == 40
    cfg["data"]["split_by"] = "autor"  # named like a missing text column: the file's own columns, a suggestion
    error = data_error(cfg)
    assert "no column 'autor' (data.split_by); the file has: 'text', 'label', 'author'; did you mean 'author'?" in \
        str(error)


def test_a_threshold_is_a_probability_and_only_for_multi_label() -> None:
    from lmtune.config import load_config

    with pytest.raises(ConfigError, match=r"task.threshold=0.7: thresholds are for task.multi_label=true"):
        load_config({"task": {"name": "classification", "threshold": 0.7}})
    with pytest.raises(ConfigError, match=r"task.threshold=1.5: a probability between 0 and 1"):
        load_config({"task": {"name": "classification", "multi_label": True, "threshold": 1.5}})
    for threshold in (0.3, "tune"):
        assert load_config({"task": {"name": "classification", "multi_label": True,
                                     "threshold": threshold}}).task.threshold == threshold
