"""train.class_weights: the training loss weighs each class as computed by hand; a run trains with it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lmtune
from lmtune.config import ConfigError, load_config
from lmtune.registry import TASKS


def task(multi: bool = False):
    cfg = load_config({"data": {"train": "x.csv"}, "task": {"name": "classification", "multi_label": multi}})
    t = TASKS["classification"](cfg.task, cfg.data, labels=["a", "b", "c"])
    t.counts, t.rows = {"a": 60, "b": 30, "c": 10}, 100
    return t


def test_balanced_weights_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 1, 2])
    loss = task().weighted_loss("balanced", 0.0)(SimpleNamespace(logits=logits), {"labels": labels})
    w = torch.tensor([100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)])  # rows / (classes x the class's rows)
    nll = -torch.log_softmax(logits, -1)[torch.arange(4), labels]
    assert float(loss) == pytest.approx(float((w[labels] * nll).sum() / w[labels].sum()), rel=1e-6)
    given = task().weighted_loss({"c": 4.0}, 0.0)(SimpleNamespace(logits=logits), {"labels": labels})
    w = torch.tensor([1.0, 1.0, 4.0])
    assert float(given) == pytest.approx(float((w[labels] * nll).sum() / w[labels].sum()), rel=1e-6)
    with pytest.raises(Exception, match="unknown label.*'d'"):
        task().weighted_loss({"d": 2.0}, 0.0)


def test_multi_label_weighs_positives_by_negatives_over_positives() -> None:
    logits = torch.tensor([[0.3, -0.2, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    loss = task(multi=True).weighted_loss("balanced", 0.0)(SimpleNamespace(logits=logits), {"labels": targets})
    pos = torch.tensor([40 / 60, 70 / 30, 90 / 10])
    by_hand = -(pos * targets * torch.nn.functional.logsigmoid(logits) +
                (1 - targets) * torch.nn.functional.logsigmoid(-logits)).mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-6)


def test_a_run_trains_with_class_weights_and_other_tasks_refuse_them(tiny_config: dict) -> None:
    tiny_config["train"].update(class_weights="balanced", max_steps=4)
    result = lmtune.train(tiny_config)
    assert result.metrics["steps"] == 4
    tiny_config["task"] = {"name": "regression"}
    tiny_config["data"]["label_column"] = "label"
    with pytest.raises(ConfigError, match="train.class_weights: for classification"):
        lmtune.train(tiny_config)


def test_balanced_sampling_draws_classes_evenly_and_repeats_per_epoch() -> None:
    import numpy as np

    from lmtune.training.batching import train_batches

    labels = np.array([0] * 900 + [1] * 100)
    weights = 1.0 / np.bincount(labels)[labels]
    batches = train_batches([10] * 1000, 32, seed=3, epoch=0, group_by_length=True, weights=weights)
    drawn = labels[[i for b in batches for i in b]]
    assert len(drawn) == 1000 and 0.44 < drawn.mean() < 0.56  # the 10% class drawn about half the time
    again = train_batches([10] * 1000, 32, seed=3, epoch=0, group_by_length=True, weights=weights)
    assert again == batches  # rebuilt the same on a resume
    assert train_batches([10] * 1000, 32, seed=3, epoch=1, group_by_length=True, weights=weights) != batches


def test_a_run_trains_with_balanced_sampling(tiny_config: dict) -> None:
    tiny_config["data"]["sampler"] = "balanced"
    tiny_config["train"]["max_steps"] = 3
    assert lmtune.train(tiny_config).metrics["steps"] == 3
    tiny_config["task"]["multi_label"] = True
    with pytest.raises(ConfigError, match="data.sampler: balanced"):
        lmtune.train(tiny_config)


def test_tuned_thresholds_are_chosen_on_validation_saved_and_used(tiny_model_dir, tmp_path) -> None:
    import json
    import random

    from helpers import write_jsonl

    rng = random.Random(0)
    rows = []
    for _ in range(160):
        good, night = rng.random() < 0.5, rng.random() < 0.2
        words = (["great"] if good else ["awful"]) + (["night"] if night else ["day"]) + ["film"]
        rows.append({"text": " ".join(words), "label": (["pos"] if good else []) + (["late"] if night else [])})
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "validation_size": 0.25},
           "task": {"name": "classification", "multi_label": True, "threshold": "tune"},
           "method": {"name": "full"}, "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3},
           "output": {"dir": str(tmp_path / "runs"), "name": "tuned"}}
    result = lmtune.train(cfg)
    tuned = result.metrics["tuned"]["thresholds"]
    assert set(tuned) == {"late", "pos"} and all(0.05 <= t <= 0.95 for t in tuned.values())
    saved = json.loads((result.run_dir / "model" / "config.json").read_text())["lmtune_thresholds"]
    loaded = lmtune.load(result.run_dir)
    assert loaded.session.task.thresholds == saved == [tuned[name] for name in loaded.session.task.labels]
    (pred,) = loaded.predict(["great night film"])
    assert pred["labels"] == [name for name in loaded.session.task.labels
                              if pred["scores"][name] >= tuned[name]]  # each label at its own threshold
