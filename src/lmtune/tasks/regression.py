"""Regression: one or several real-valued targets per text or text pair (semantic similarity, ratings). Targets are
standardised for training (the scaling saved with the model) and predictions come back in the original units."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np
import torch

from lmtune.data import DataError, apply_row_checks, carve_splits, count_overlap, pad_inputs, read_table, \
    require_columns, resolve_path
from lmtune.data.fingerprint import in_memory, mapped, tokenized
from lmtune.evaluation.correlation import pearson, spearman
from lmtune.registry import register_task
from lmtune.tasks.base import MISTAKES, Task
from lmtune.tasks.pooling import PooledTask, PoolingOptions

if TYPE_CHECKING:
    from lmtune.config import DataConfig

log = logging.getLogger("lmtune")


class RegressionOptions(PoolingOptions):
    name: Literal["regression"] = "regression"
    """Predict one or several real numbers for each text (or text pair): similarity scores, ratings."""
    loss: Literal["mse", "huber"] = "mse"
    """Training loss on the standardised targets: mean squared error, or Huber (less swayed by outliers)."""


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@register_task("regression")
class Regression(PooledTask, Task):
    pipeline_tag = "text-classification"  # what the Hub calls a sequence-level head, regression included
    Options = RegressionOptions
    default_metric = "pearson"
    metric_names = ("pearson", "spearman", "rmse", "mae", "loss")

    def __init__(self, options: RegressionOptions, data: DataConfig, labels: list[str] | None = None):
        self.options, self.data = options, data
        columns = data.label_column if isinstance(data.label_column, list) else [data.label_column]
        self.labels = labels or list(columns)  # target names (saved as the model's label names)
        self.scale: tuple[np.ndarray, np.ndarray] | None = None  # (mean, std) of the training targets

    @staticmethod
    def greater_is_better(metric: str) -> bool:
        return metric.removeprefix("eval/") in ("pearson", "spearman")

    # ---- data ------------------------------------------------------------------------------------
    def _read(self, path: str, require_targets: bool = True) -> tuple[Any, list[str]]:
        cfg = self.data
        file = resolve_path(path)
        malformed: list[str] = []
        ds = read_table(file, cfg.format, on_bad_rows=cfg.on_bad_rows, skipped=malformed, quoting=cfg.quoting)
        texts = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
        require_columns(ds, str(file), texts + (self.labels if require_targets else []))

        def check(row: dict) -> tuple[str, str] | None:
            for column in texts:
                if not isinstance(row[column], str) or not row[column].strip():
                    return column, "empty text"
            for column in self.labels if require_targets else []:
                if _number(row[column]) is None:
                    return column, f"the target is not a finite number ({row[column]!r})"
            return None

        ds, skipped = apply_row_checks(ds, str(file), check, cfg.on_bad_rows)

        def convert(batch: dict) -> dict:
            out: dict[str, Any] = {"_row": batch["_row"], "text": [t.strip() for t in batch[cfg.text_column]]}
            if cfg.text_pair_column:
                out["text_pair"] = [t.strip() for t in batch[cfg.text_pair_column]]
            if cfg.split_by in batch:
                out[cfg.split_by] = batch[cfg.split_by]
            if require_targets:
                out["targets"] = [[float(batch[c][i]) for c in self.labels] for i in range(len(batch["_row"]))]
            return out

        return ds.map(convert, batched=True, remove_columns=ds.column_names), malformed + skipped

    def load_splits(self, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = self.data
        if not cfg.train:
            raise DataError("data.train", "no training file given (set data.train)")
        report: dict[str, Any] = {"skipped_rows": {}, "skipped_examples": []}

        def read(name: str, path: str) -> Any:
            ds, messages = self._read(path)
            report["skipped_rows"][name] = len(messages)
            report["skipped_examples"] += messages[:20]
            return ds

        train = read("train", cfg.train)
        train, splits = carve_splits(train, cfg, seed, read, report)
        for name in list(splits):
            report.setdefault("overlap_with_train", {})[name] = count_overlap(train["text"][:], splits[name]["text"][:])
        splits["train"] = train
        targets = np.asarray(train["targets"][:], dtype=np.float64)
        mean, std = targets.mean(0), targets.std(0)
        self.scale = (mean, np.where(std > 0, std, 1.0))
        report.update(rows={k: len(v) for k, v in splits.items()}, targets=self.labels,
                      target_mean=mean.tolist(), target_std=std.tolist())
        return splits, report

    def load_eval_file(self, path: str) -> Any:
        return self._read(path)[0]

    def from_texts(self, records: list[Any]) -> Any:
        """Inputs for prediction: strings, or dicts with `text` (and `text_pair`)."""
        rows = [r if isinstance(r, dict) else {"text": r} for r in records]
        fields = ["text"] + (["text_pair"] if self.data.text_pair_column else [])
        for i, row in enumerate(rows, 1):
            for field in fields:
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise DataError("input", f"no `{field}`" + (" (this model scores text pairs: give each input "
                                                                "`text` and `text_pair`)" if field == "text_pair"
                                                                else ""), row=i, field=field)
        return in_memory({f: [r[f].strip() for r in rows] for f in fields})

    # ---- model -----------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {n: i for i, n in enumerate(self.labels)}, "problem_type": "regression"}

    @property
    def auto_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def prepare_model(self, model: Any) -> None:
        """The targets' scaling goes into the model's config (saved with it; predictions are unscaled with it)."""
        from lmtune.models import base_model_config

        mean, std = self.scale
        config = base_model_config(model)
        config.lmtune_target_mean, config.lmtune_target_std = mean.tolist(), std.tolist()

    def restore(self, config: Any) -> None:
        """The scaling a trained model was saved with (a finished run loaded back), and its head."""
        super().restore(config)
        self.scale = (np.asarray(config.lmtune_target_mean), np.asarray(config.lmtune_target_std))

    # ---- features --------------------------------------------------------------------------------
    def encode(self, ds: Any, tokenizer: Any, max_length: int) -> Any:
        mean, std = self.scale if self.scale is not None else (0.0, 1.0)

        def tokenize(batch: dict) -> dict:
            enc = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            if "targets" in batch:
                enc["labels"] = ((np.asarray(batch["targets"], dtype=np.float64) - mean) / std).tolist()
            return enc

        return mapped(ds, tokenize, tokenized(ds, tokenizer, max_length, self.labels, np.asarray(mean).tolist(),
                                              np.asarray(std).tolist()))

    def collate(self, tokenizer: Any, pad_to_multiple_of: int, max_width: int | None = None) -> Any:
        single = len(self.labels) == 1

        def collate(rows: list[dict]) -> dict:
            batch = pad_inputs(rows, tokenizer, pad_to_multiple_of, max_width=max_width)
            if "labels" in rows[0]:
                labels = torch.tensor([r["labels"] for r in rows], dtype=torch.float32)
                batch["labels"] = labels[:, 0] if single else labels  # (transformers' MSE squeezes one target)
            return batch

        return collate

    # ---- outputs ---------------------------------------------------------------------------------
    def _collect(self, outputs: Iterable, n: int) -> tuple[np.ndarray, float | None]:
        """Predictions of all n rows in the targets' own units, and the mean training loss."""
        found = np.zeros((n, len(self.labels)), dtype=np.float64)
        loss_sum, count = 0.0, 0
        for indices, out, batch in outputs:
            found[indices] = out.logits.float().cpu().numpy().reshape(len(indices), -1)
            if "labels" in batch:
                loss_sum += float(self.loss(out.logits.float(), batch["labels"].to(out.logits.device))) * len(indices)
                count += len(indices)
        mean, std = self.scale
        return found * std + mean, (loss_sum / count if count else None)

    def own_loss(self) -> Any:
        return (lambda outputs, batch: self.loss(outputs.logits.float(), batch["labels"])) \
            if self.options.loss == "huber" else None

    def loss(self, predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss on standardised targets (train.loss comes from here, not from the model)."""
        predicted = predicted.reshape(labels.shape)
        if self.options.loss == "huber":
            return torch.nn.functional.huber_loss(predicted, labels)
        return torch.nn.functional.mse_loss(predicted, labels)

    def evaluate(self, outputs: Iterable, features: Any, examples: Any = None
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        """Pearson, Spearman (the mean over targets), RMSE and MAE in the targets' units; per target in details."""
        predicted, loss = self._collect(outputs, len(features))
        mean, std = self.scale
        gold = np.asarray(features["labels"][:], dtype=np.float64).reshape(len(features), -1) * std + mean
        per = {}
        for j, name in enumerate(self.labels):
            p, g = predicted[:, j], gold[:, j]
            per[name] = {"pearson": pearson(p, g), "spearman": spearman(p, g),
                         "rmse": float(np.sqrt(((p - g) ** 2).mean())), "mae": float(np.abs(p - g).mean())}
        scalars = {k: float(np.mean([t[k] for t in per.values()])) for k in ("pearson", "spearman", "rmse", "mae")}
        if loss is not None:
            scalars["loss"] = loss
        details: dict[str, Any] = {"per_target": per, "targets": self.labels}
        if examples is not None:
            error = np.abs(predicted - gold).max(1)
            worst = np.argsort(-error, kind="stable")[:MISTAKES]
            rows = examples.select(worst.tolist())
            pairs = rows["text_pair"][:] if "text_pair" in rows.column_names else [None] * len(rows)
            details["mistakes"] = [{"row": int(i), "text": t, **({"text_pair": q} if q is not None else {}),
                                    "gold": ", ".join(f"{x:.3g}" for x in gold[i]),
                                    "predicted": ", ".join(f"{x:.3g}" for x in predicted[i]),
                                    "score": float(error[i])}
                                   for i, t, q in zip(worst, rows["text"][:], pairs)]
        return scalars, details

    def postprocess(self, outputs: Iterable, n: int) -> list[dict[str, Any]]:
        predicted, _ = self._collect(outputs, n)
        # Seven significant digits (float32's), whatever the targets' scale: 1e-7-sized targets keep their values.
        if len(self.labels) == 1:
            return [{"score": float(f"{p[0]:.7g}")} for p in predicted]
        return [{"scores": {name: float(f"{v:.7g}") for name, v in zip(self.labels, p)}} for p in predicted]
