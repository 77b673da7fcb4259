"""End to end on a tiny model: train -> run directory -> load -> predict/eval, and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmtune
from lmtune.config import load_config


def train_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> lmtune.RunResult:
    """One full run shared by the read-only checks below (training is the slow part)."""
    from helpers import make_sentiment_rows, write_csv

    root = tmp_path_factory.mktemp("trained")
    train = write_csv(root / "train.csv", make_sentiment_rows(96, seed=1))
    test = write_csv(root / "test.csv", make_sentiment_rows(32, seed=2))
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(train), "test": str(test), "validation_size": 0.25},
           "train": {"epochs": 4, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0.0, "log_every": 2, "seed": 7},
           "output": {"dir": str(root / "runs"), "name": "tiny"}}
    return lmtune.train(cfg)


def test_training_learns(trained) -> None:
    losses = [r["train/loss"] for r in train_records(trained.run_dir) if "train/loss" in r]
    assert len(losses) >= 5
    assert sum(losses[-2:]) / 2 < 0.6 * sum(losses[:2]) / 2, losses
    m = trained.metrics
    assert m["test"]["accuracy"] >= 0.9
    assert m["selection"]["metric"] == "accuracy" and m["selection"]["best"] >= 0.9
    assert set(m["test"]["per_class"]) == {"negative", "positive"}
    assert sum(map(sum, m["test"]["confusion_matrix"])) == 32
    assert m["test"]["majority_baseline"]["accuracy"] == 0.5  # the synthetic test set is balanced


def test_run_directory_contents(trained) -> None:
    run = trained.run_dir
    for name in ("config.yaml", "metrics.json", "metrics.jsonl", "model/model.safetensors", "model/tokenizer.json",
                 "plots/learning_curves.png", "plots/confusion_test.png"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists()  # removed once the run finished
    assert load_config(run / "config.yaml").train.epochs == 4
    m = json.loads((run / "metrics.json").read_text())
    assert m["params"]["trainable"] == m["params"]["total"] > 0
    assert m["train_examples_per_second"] > 0 and m["data"]["rows"] == {"train": 72, "validation": 24, "test": 32}
    assert m["data"]["skipped_rows"] == {"train": 0, "test": 0}


def test_pipeline_loads_the_model_with_label_names(trained) -> None:
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(trained.run_dir / "model"), device="cpu")
    out = classify(["great excellent film", "awful terrible film"])
    assert [o["label"] for o in out] == ["positive", "negative"]


def test_load_predict_and_eval_agree_with_training(trained) -> None:
    predictor = lmtune.load(trained.run_dir)
    preds = predictor.predict(["wonderful great drug", "horrible worst drug", {"text": "love it, best"}])
    assert [p["label"] for p in preds] == ["positive", "negative", "positive"]
    assert abs(sum(preds[0]["scores"].values()) - 1) < 1e-4
    with pytest.raises(lmtune.data.DataError, match=r"row 2, field 'text': no `text` field \(fields found: review, id\)"):
        predictor.predict(["fine", {"review": "the training file's column", "id": 7}])
    test_file = load_config(trained.run_dir / "config.yaml").data.test
    metrics = lmtune.evaluate(trained.run_dir, test_file)
    assert metrics["rows"] == 32
    assert metrics["accuracy"] == pytest.approx(trained.metrics["test"]["accuracy"])


def test_cli_predict_jsonl_and_stdin(trained, tmp_path) -> None:
    from typer.testing import CliRunner

    from lmtune.cli import app

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"id": 1, "text": "great best film"}\n{"id": 2, "text": "worst awful film"}\n')
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(inputs), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["label"]) for r in rows] == [(1, "positive"), (2, "negative")]
    # An input column named like a prediction field (a gold label) is kept; the prediction goes beside it.
    gold = tmp_path / "gold.tsv"
    gold.write_text("text\tlabel\ngreat best film\t1\nworst awful film\t0\n")
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(gold), "-o", str(tmp_path / "p.tsv")])
    assert result.exit_code == 0 and "predictions written as predicted_label" in " ".join(result.output.split())
    table = (tmp_path / "p.tsv").read_text().splitlines()
    assert table[0].split("\t")[:3] == ["text", "label", "predicted_label"]
    assert [line.split("\t")[1:3] for line in table[1:]] == [["1", "positive"], ["0", "negative"]]
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir)], input="excellent great\nterrible bad\n")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["label"] for r in lines] == ["positive", "negative"]
    inputs.write_text('{"id": 1, "body": "great best film"}\n{"id": 2, "text": "worst awful film"}\n')
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(inputs), "--text-column", "body"])
    assert result.exit_code == 1 and "row 2: no 'body' field (--text-column); fields found: id, text" in \
        " ".join(result.output.split())


EMPTY = "empty text: nothing to predict"


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_cli_predict_gives_every_input_line_its_own_output_line(trained, tmp_path) -> None:
    """Blank and whitespace-only lines get an error record in their place (they were dropped: outputs no longer lined
    up with inputs); CRLF line ends leave no `\\r` in the text, on stdin as in a file."""
    from typer.testing import CliRunner

    from lmtune.cli import app

    lines = ["great best film", "", "   ", "worst awful film", "\t", "love it, excellent"]
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir)], input="\r\n".join(lines) + "\r\n")
    assert result.exit_code == 0, result.output
    rows = _json_lines(result.stdout)
    assert [r["text"] for r in rows] == lines
    assert [r.get("label") or r["error"] for r in rows] == ["positive", EMPTY, EMPTY, "negative", EMPTY, "positive"]
    assert all(set(r) == {"text", "error"} for r in rows if "error" in r)
    # a text file: 1,003 lines (three blank) in, 1,003 out, each where its input was; the final newline ends the
    # last line and makes none
    texts = ["great best film" if i % 2 else "worst awful film" for i in range(1003)]
    for i in (0, 500, 1002):
        texts[i] = " " * (i % 3)
    source = tmp_path / "in.txt"
    source.write_bytes(("\r\n".join(texts) + "\r\n").encode())
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = _json_lines(out.read_text())
    assert len(rows) == 1003 and [r["text"] for r in rows] == texts
    assert [i for i, r in enumerate(rows) if r.get("error") == EMPTY] == [0, 500, 1002]
    assert [r["label"] for r in rows[1:5]] == ["positive", "negative", "positive", "negative"]
    source.write_text("great best film\n\n")  # a blank last line is a line (only the final newline is not)
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(source)])
    assert [r.get("error") for r in _json_lines(result.stdout)] == [None, EMPTY]


def test_cli_predict_table_rows_with_empty_text_get_an_error_record(trained, tmp_path) -> None:
    from typer.testing import CliRunner

    from lmtune.cli import app

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"id": 1, "text": ""}\n{"id": 2, "text": "great best film"}\n{"id": 3, "text": " \\t "}\n'
                     '{"id": 4, "text": "worst awful film"}\n')
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(jsonl)])
    assert result.exit_code == 0, result.output
    rows = _json_lines(result.stdout)
    assert [(r["id"], r.get("label") or r["error"]) for r in rows] == [(1, EMPTY), (2, "positive"), (3, EMPTY),
                                                                        (4, "negative")]
    table = tmp_path / "in.csv"  # an empty CSV field is empty text too
    table.write_text("id,text\n1,great best film\n2,\n3,   \n4,worst awful film\n")
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(table), "-o", str(out)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    written = pd.read_csv(out, keep_default_na=False)
    assert list(written["id"]) == [1, 2, 3, 4] and list(written["label"]) == ["positive", "", "", "negative"]
    assert list(written["error"]) == ["", EMPTY, EMPTY, ""]
    # any other problem still stops the command, naming the row as the file counts it
    jsonl.write_text('{"id": 1, "text": ""}\n{"id": 2, "text": "great"}\n{"id": 3, "text": 7}\n')
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(jsonl)])
    assert result.exit_code == 1 and "row 3" in result.output, result.output


def test_cli_predict_outputs_by_their_names_atomically_and_bad_paths_in_one_line(trained, tmp_path,
                                                                                monkeypatch) -> None:
    import gzip

    from typer.testing import CliRunner

    from lmtune import files
    from lmtune.cli import app

    lines = tmp_path / "in.txt.gz"  # gzipped text lines, read as text lines
    lines.write_bytes(gzip.compress(b"great best film\nworst awful film\n"))
    out = tmp_path / "new" / "PREDS.CSV.GZ"  # by its suffix whatever the case; .gz compressed
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(lines), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert gzip.decompress(out.read_bytes()).decode().splitlines()[0].startswith("text,label")
    before = out.read_bytes()

    def full_disk(path, write):  # the write fails half-way: the earlier output stays whole
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "replace_file", full_disk)
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(lines), "-o", str(out)])
    assert result.exit_code == 1 and "No space left" in result.output and "Traceback" not in result.output
    assert out.read_bytes() == before
    monkeypatch.undo()
    for bad in (tmp_path, lines / "x.jsonl"):  # a folder; a path under a file: refused before predicting
        result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(lines), "-o", str(bad)])
        assert result.exit_code == 1 and "Traceback" not in result.output and (
            "is a folder" in result.output or "is a file, not a folder" in result.output), result.output
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(tmp_path / "latin1.txt")])
    assert result.exit_code == 1 and "latin1.txt" in result.output and "UTF-8" in result.output

def test_cli_eval_and_validate(trained, tiny_config, tmp_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from lmtune.cli import app

    test_file = load_config(trained.run_dir / "config.yaml").data.test
    saved = tmp_path / "new" / "folder" / "metrics.json"  # folders made as predict makes them
    result = CliRunner().invoke(app, ["eval", str(trained.run_dir), "--data", test_file, "-o", str(saved)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and json.loads(saved.read_text())["rows"] == 32
    bad = tmp_path / "bad.csv"  # one row without text: an error naming eval's own way to drop it, or dropped
    bad.write_text(Path(test_file).read_text() + ",positive\n")
    result = CliRunner().invoke(app, ["eval", str(trained.run_dir), "--data", str(bad)])
    assert result.exit_code == 1 and "lmtune eval --skip-bad-rows" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["eval", str(trained.run_dir), "--data", str(bad), "--skip-bad-rows"])
    assert result.exit_code == 0 and "(32 rows)" in result.output
    predictor = lmtune.load(trained.run_dir)  # skipping is for that call: the run's own policy stays
    assert predictor.evaluate(bad, "skip")["rows"] == 32
    with pytest.raises(lmtune.data.DataError, match="empty text"):
        predictor.evaluate(bad)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "config and data are valid" in result.output
    result = CliRunner().invoke(app, ["validate", str(config), "train.lrr=1"])
    assert result.exit_code == 1 and "did you mean 'lr'" in result.output


def test_head_method_keeps_the_backbone(tiny_config, tiny_model_dir) -> None:
    tiny_config["method"] = {"name": "head", "lr": 1e-2}
    result = lmtune.train(tiny_config)
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(result.run_dir / "model" / "model.safetensors"))
    backbone = [k for k in after if k.startswith("bert.")]
    assert backbone and all(torch.equal(after[k], before[k.removeprefix("bert.")]) for k in backbone)
    assert result.metrics["params"]["trainable"] < result.metrics["params"]["total"] / 10


class Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted(tiny_config, caplog) -> None:
    tiny_config["train"].update(eval_every=3, epochs=3)
    tiny_config["output"]["name"] = "straight"
    straight = lmtune.train(tiny_config)

    tiny_config["output"]["name"] = "resumed"

    def crash(state) -> None:
        if state.step == 7:  # after the step-6 checkpoint, mid-epoch: the resume must replay steps 7..
            raise Interrupt

    with pytest.raises(Interrupt):
        lmtune.train(tiny_config, callbacks=[crash])
    run_dir = Path(tiny_config["output"]["dir"]) / "resumed"
    assert (run_dir / "checkpoints" / "last").is_dir() and not (run_dir / "model").exists()
    with pytest.raises(FileExistsError, match="or pass --resume to continue it"):
        lmtune.train(tiny_config)
    with caplog.at_level("INFO", logger="lmtune"):
        resumed = lmtune.train(tiny_config, resume=True)
    assert f"resuming {run_dir} at step 6 (stage 1, epoch 1, batch 6 of it)" in caplog.text

    a = load_file(str(straight.run_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert resumed.metrics["steps"] == straight.metrics["steps"]
    steps = [r["step"] for r in train_records(run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice after the resume
    assert sum("stage/trainable_params" in r for r in train_records(run_dir)) == 1  # nor the stage's line


def test_resume_refuses_training_data_of_another_size_and_warns_of_changed_rows(tiny_config, tmp_path,
                                                                                caplog) -> None:
    from helpers import make_sentiment_rows, write_csv

    from lmtune.errors import CheckpointError

    train = Path(tiny_config["data"]["train"])
    tiny_config["train"].update(eval_every=3, epochs=2)

    def crash(state) -> None:
        if state.step == 4:  # after the step-3 checkpoint
            raise Interrupt

    with pytest.raises(Interrupt):
        lmtune.train(tiny_config, callbacks=[crash])
    original = train.read_bytes()
    write_csv(train, make_sentiment_rows(112, seed=3))  # the file extended in between: the position means nothing
    with pytest.raises(CheckpointError, match="has 84 rows now and had 72"):
        lmtune.train(tiny_config, resume=True)
    rows = make_sentiment_rows(96, seed=1)
    rows[0]["label"] = "negative" if rows[0]["label"] == "positive" else "positive"  # as many rows, one label fixed
    write_csv(train, rows)
    assert train.read_bytes() != original
    with caplog.at_level("WARNING", logger="lmtune"):
        resumed = lmtune.train(tiny_config, resume=True)
    assert "the training data changed since the run started" in caplog.text
    assert (resumed.run_dir / "model" / "config.json").is_file()


# (method, train settings, the step to interrupt after): each resume must give the uninterrupted run's weights.
RESUMES = {
    # interrupted in the fine-tuning stage before its first checkpoint: the probe's last one is read, and the
    # fine-tuning stage starts afresh (it used to load the probe's optimizer state, and fail)
    "lp_ft_second_stage": ({"name": "lp_ft", "probe_epochs": 1, "epochs": 1}, {}, 11),
    # interrupted after the checkpoint of a stage that ended at max_steps mid-epoch: no step more on resuming
    "max_steps_done": ({"name": "full"}, {"max_steps": 5, "schedule": "constant", "load_best": False}, 5),
    # the head on cached features: re-caching after the resume must not change the dropout masks that follow
    "cached_head": ({"name": "head", "lr": 1e-2}, {"epochs": 2, "eval_every": 4, "load_best": False}, 5),
    # the weight average goes on from the checkpoint's average, not from the resumed weights
    "weight_average": ({"name": "full"}, {"ema_decay": 0.9, "eval_every": 3, "load_best": False}, 5),
}


@pytest.mark.parametrize("case", sorted(RESUMES))
def test_resume_of_stages_matches_uninterrupted(case: str, tiny_config) -> None:
    method, train, at = RESUMES[case]
    tiny_config["method"] = method
    tiny_config["train"].update(train)
    tiny_config["output"]["name"] = "straight"
    straight = lmtune.train(tiny_config)
    tiny_config["output"]["name"] = "resumed"

    def crash(state) -> None:
        if state.step == at:
            raise Interrupt

    with pytest.raises(Interrupt):
        lmtune.train(tiny_config, callbacks=[crash])
    resumed = lmtune.train(tiny_config, resume=True)
    assert resumed.metrics["steps"] == straight.metrics["steps"]
    a = load_file(str(straight.run_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_resume_refuses_a_changed_config(tiny_config) -> None:
    def crash(state) -> None:
        if state.step == 9:
            raise Interrupt

    with pytest.raises(Interrupt):
        lmtune.train(tiny_config, callbacks=[crash])
    with pytest.raises(ValueError, match=r"config differs.*: train\.lr: .* -> 0\.001\. Resume"):
        lmtune.train(tiny_config, ["train.lr=1e-3"], resume=True)
    with pytest.raises(ValueError, match="config differs.*train.compile: False -> True"):  # compiled runs fold a one-row last batch
        lmtune.train(tiny_config, ["train.compile=true"], resume=True)
    # How fast the same steps run may change (e.g. CUDA graphs off after a memory error).
    assert lmtune.train(tiny_config, ["train.cuda_graphs=false", "train.num_workers=0"], resume=True).metrics["steps"]


def test_existing_run_directory_is_not_overwritten(tiny_config) -> None:
    tiny_config["train"]["max_steps"] = 1
    lmtune.train(tiny_config)
    with pytest.raises(FileExistsError, match="output.overwrite=true") as info:
        lmtune.train(tiny_config)
    assert "--resume" not in str(info.value)  # a finished run has nothing to resume


def test_a_run_that_failed_on_its_data_does_not_block_the_next(tiny_config, tmp_path) -> None:
    from lmtune.data import DataError

    good = tiny_config["data"]["train"]
    tiny_config["train"]["max_steps"] = 1
    tiny_config["data"]["train"] = str(tmp_path / "missing.csv")
    with pytest.raises(DataError):
        lmtune.train(tiny_config)
    tiny_config["data"]["train"] = good  # fixed: the same output.name trains without overwrite
    assert lmtune.train(tiny_config).metrics["steps"] == 1


def test_seed_summary_covers_generation_scores_and_forgetting() -> None:
    from lmtune.studies.seeds import summarise

    per_seed = {seed: {"test": {"perplexity": 10.0 + seed, "generation": {"accuracy": 0.5 + seed / 10},
                                "per_class": {"neg": {"f1": 0.5}}},
                       "forgetting": {"perplexity_after": 20.0 + seed, "relative_change": 0.1},
                       "train_seconds": 1.0} for seed in (1, 3)}
    summary = summarise(per_seed)
    assert summary["test"]["generation/accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["forgetting"]["perplexity_after"]["max"] == 23.0
    assert "per_class/neg" not in summary["test"]  # tables two levels down stay in each seed's metrics.json


def test_several_seeds_write_a_run_each_and_their_spread(tiny_config, tmp_path) -> None:
    import statistics

    import yaml
    from typer.testing import CliRunner

    from lmtune.cli import app

    tiny_config["train"].update(epochs=1, checkpoint=False)
    tiny_config["output"]["name"] = "two-seeds"
    config = tmp_path / "seeded.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["train", str(config), "--seeds", "3,8"])
    assert result.exit_code == 0, result.output
    parent = tmp_path / "runs" / "two-seeds"
    per_seed = {s: json.loads((parent / f"seed-{s}" / "metrics.json").read_text()) for s in (3, 8)}
    assert {s: load_config(parent / f"seed-{s}" / "config.yaml").train.seed for s in (3, 8)} == {3: 3, 8: 8}
    summary = json.loads((parent / "seeds.json").read_text())
    assert summary["seeds"] == [3, 8]
    for split in ("validation", "test"):
        for metric in ("accuracy", "macro_f1", "loss"):
            values = [per_seed[s][split][metric] for s in (3, 8)]
            assert summary[split][metric] == pytest.approx({"mean": statistics.fmean(values), "n": 2,
                                                            "std": statistics.stdev(values), "min": min(values),
                                                            "max": max(values)})
    assert "| test | accuracy |" in (parent / "seeds.md").read_text()
    # The Python API: the same through train.seeds, resumed: finished seeds are read back, not retrained.
    finished = (parent / "seed-3" / "metrics.json").stat().st_mtime_ns
    again = lmtune.train(config, ["train.seeds=[3, 8]"], resume=True)
    assert again.run_dir == parent and again.metrics["test"] == summary["test"]
    assert (parent / "seed-3" / "metrics.json").stat().st_mtime_ns == finished
    # Resumed with another config, the finished seeds would be summarised with seeds trained otherwise: refused.
    before = (parent / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"--resume: the config differs .*train.lr"):
        lmtune.train(config, ["train.seeds=[3, 8]", "train.lr=0.5"], resume=True)
    assert (parent / "config.yaml").read_text() == before


def test_label_smoothing_raises_the_training_loss_of_a_fitted_model(tiny_config) -> None:
    tiny_config["train"].update(epochs=4, checkpoint=False)
    plain = lmtune.train(tiny_config)
    tiny_config["train"]["label_smoothing"] = 0.2
    tiny_config["output"]["name"] = "smoothed"
    smoothed = lmtune.train(tiny_config)
    losses = {name: [r["train/loss"] for r in train_records(run.run_dir) if "train/loss" in r]
              for name, run in (("plain", plain), ("smoothed", smoothed))}
    # Smoothed targets over 2 classes are (0.9, 0.1): no prediction gets the loss below their entropy.
    floor = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))  # 0.325
    assert losses["plain"][-1] < floor <= min(losses["smoothed"]) + 1e-4, losses
    assert smoothed.metrics["test"]["accuracy"] >= 0.9  # the model still learns the task


def test_evaluation_batches_are_sized_by_the_width_the_collate_pads_to(tiny_config: dict) -> None:
    """Session.width must be the collate's own width rule (multiple and cap included): evaluation batches of short
    rows are sized by it, and a wrong rule would let them hold more padded tokens than the longest batch."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from lmtune.registry import TASKS
    from lmtune.session import Session
    from lmtune.training.batching import eval_batches

    tiny_config["model"]["max_length"] = 60
    tiny_config["train"]["pad_to_multiple_of"] = 48  # rounds 57 up to 96: the cap (64) must apply
    cfg = load_config(tiny_config)
    task = TASKS["classification"](cfg.task, cfg.data)
    tokenizer = AutoTokenizer.from_pretrained(tiny_config["model"]["name"])
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    session = Session(cfg, task, tokenizer, model, SimpleNamespace(device=torch.device("cpu")))
    lengths = [57] * 4 + [20] * 50 + [3] * 200
    rows = [{"input_ids": [5] * n, "attention_mask": [1] * n, "labels": 0} for n in lengths]
    widths = {n: session.collate([rows[lengths.index(n)]])["input_ids"].shape[1] for n in set(lengths)}
    assert widths == {n: session.width(n) for n in widths} == {57: 64, 20: 48, 3: 48}
    batches = eval_batches(lengths, 4, width=session.width)
    padded = [len(b) * session.collate([rows[i] for i in b])["input_ids"].shape[1] for b in batches]
    assert padded[0] == 4 * 64 and max(padded) <= padded[0] and len(batches) < len(lengths) / 4
