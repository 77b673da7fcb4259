"""A task written outside lmtune against its contract alone (lmtune.tasks.Task): word-list sentiment from a CSV with
`text` and `label` columns. tests/test_toy_task.py registers it and trains it under every method."""

from __future__ import annotations

from typing import Any, Literal

import datasets
import torch
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForSequenceClassification

from lmtune.data import read_table
from lmtune.tasks import Task

LABELS = ["negative", "positive"]


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["toy_sentiment"] = "toy_sentiment"
    """Two-class sentiment, the least a task needs."""


class ToySentiment(Task):
    Options = ToyOptions
    auto_class = AutoModelForSequenceClassification
    default_metric = "accuracy"
    metric_names = ("accuracy", "loss")
    cross_entropy_targets = [("logits", "labels")]

    def __init__(self, options: ToyOptions, data: Any, labels: list[str] | None = None) -> None:
        self.data = data

    def _rows(self, path: str) -> datasets.Dataset:
        table = read_table(path)
        return datasets.Dataset.from_dict({"text": table["text"], "label": [LABELS.index(x) for x in table["label"]]})

    def load_splits(self, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        train = self._rows(self.data.train).shuffle(seed=seed)
        cut = len(train) // 4
        splits = {"train": train.select(range(cut, len(train))), "validation": train.select(range(cut)),
                  "test": self._rows(self.data.test)}
        return splits, {"rows": {name: len(ds) for name, ds in splits.items()}}

    def load_eval_file(self, path: str) -> datasets.Dataset:
        return self._rows(path)

    def from_texts(self, records: list[Any]) -> datasets.Dataset:
        texts = [r["text"] if isinstance(r, dict) else r for r in records]
        return datasets.Dataset.from_dict({"text": texts, "label": [0] * len(texts)})

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 2, "id2label": dict(enumerate(LABELS)), "label2id": {x: i for i, x in enumerate(LABELS)}}

    def encode(self, ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
        def tokenize(batch: dict) -> dict:
            ids = tokenizer(batch["text"], truncation=True, max_length=max_length)["input_ids"]
            return {"input_ids": ids, "length": [len(i) for i in ids]}

        return ds.map(tokenize, batched=True, remove_columns=["text"])

    def collate(self, tokenizer: Any, pad_to_multiple_of: int, max_width: int | None = None) -> Any:
        def collate(rows: list[dict]) -> dict:
            batch = tokenizer.pad([{"input_ids": r["input_ids"]} for r in rows], pad_to_multiple_of=pad_to_multiple_of,
                                  return_tensors="pt")
            return {**batch, "labels": torch.tensor([r["label"] for r in rows])}

        return collate

    def evaluate(self, outputs: Any, features: Any, examples: Any = None
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        right = total = 0
        loss = 0.0
        for _rows, out, batch in outputs:
            right += int((out.logits.argmax(-1).cpu() == batch["labels"]).sum())
            total += len(batch["labels"])
            loss += float(out.loss) * len(batch["labels"])
        return {"accuracy": right / total, "loss": loss / total}, {}

    def postprocess(self, outputs: Any, n: int) -> list[dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        for rows, out, _batch in outputs:
            for row, probs in zip(rows, out.logits.float().softmax(-1).cpu()):
                found[row] = {"label": LABELS[int(probs.argmax())], "score": round(float(probs.max()), 6)}
        return [found[i] for i in range(n)]

    def greater_is_better(self, metric: str) -> bool:
        return metric != "loss"
