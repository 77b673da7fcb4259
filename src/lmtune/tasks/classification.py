"""Text classification: single-label, multi-label and sentence pairs, with its data, head and metrics."""

from __future__ import annotations

import html
import logging
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np
import torch
from pydantic import model_validator

from lmtune.data import (DataError, apply_row_checks, carve_splits, count_overlap, listed_groups, no_text,
                         pad_inputs, read_table, require_columns, resolve_path)
from lmtune.data.fingerprint import in_memory, mapped, tokenized
from lmtune.evaluation.calibration import best_thresholds, calibration, softmax
from lmtune.evaluation.scores import confusion, label_counts, macro_f1, micro_f1, prf
from lmtune.data.labels import label_map_problem, label_renames, label_values, sort_labels
from lmtune.registry import register_task
from lmtune.tasks.base import MISTAKES, Task
from lmtune.tasks.pooling import PooledTask, PoolingOptions

if TYPE_CHECKING:
    from lmtune.config import DataConfig

log = logging.getLogger("lmtune")


class ClassificationOptions(PoolingOptions):
    name: Literal["classification"] = "classification"
    """Assign each text (or text pair) one label, or several with multi_label."""
    multi_label: bool = False
    """Each text may carry several labels (sigmoid per label instead of softmax over labels)."""
    threshold: float | Literal["tune"] = 0.5
    """Multi-label: a label is predicted when its probability reaches this value; `tune`: one threshold per label,
    chosen after training on the validation rows (best F1 of that label), saved with the model (0.5 until then)."""

    @model_validator(mode="after")
    def _check(self) -> "ClassificationOptions":
        if self.threshold != 0.5 and not self.multi_label:  # (one label a text: the most probable one)
            raise ValueError(f"task.threshold={self.threshold}: thresholds are for task.multi_label=true")
        if self.threshold != "tune" and not 0 < self.threshold < 1:
            raise ValueError(f"task.threshold={self.threshold}: a probability between 0 and 1 (or tune)")
        return self


@register_task("classification")
class Classification(PooledTask, Task):
    pipeline_tag = "text-classification"
    Options = ClassificationOptions

    def __init__(self, options: ClassificationOptions, data: DataConfig, labels: list[str] | None = None):
        self.options = options
        self.data = data
        self.labels = labels or data.labels
        self.majority: str | None = None  # most frequent training label, for the baseline in reports
        self.counts: dict[str, int] = {}  # training rows per label (train.class_weights)
        self.rows = 0  # training rows
        self.thresholds: list[float] | None = None  # task.threshold: tune, once tuned (or loaded with the model)
        self.temperature = 1.0  # eval.calibrate: logits are divided by it (fitted on validation, saved with the model)

    # ---- metrics ---------------------------------------------------------------------------------
    @property
    def default_metric(self) -> str:
        return "micro_f1" if self.options.multi_label else "accuracy"

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("micro_f1", "macro_f1", "subset_accuracy", "ece", "brier", "loss") if self.options.multi_label else \
            ("accuracy", "macro_f1", "ece", "brier", "loss")

    @staticmethod
    def greater_is_better(metric: str) -> bool:
        return "loss" not in metric and metric.removeprefix("eval/") not in ("ece", "brier")

    @property
    def cross_entropy_targets(self) -> list[tuple[str, str]]:
        return [] if self.options.multi_label else [("logits", "labels")]

    # ---- data ------------------------------------------------------------------------------------
    def _read(self, path: str, require_label: bool = True) -> tuple[Any, int, list[str]]:
        """Read one file into columns text[, text_pair], labels (list of names), _row; check every row."""
        cfg, multi = self.data, self.options.multi_label
        file = resolve_path(path)
        malformed: list[str] = []  # rows skipped as malformed (CSV/TSV) under on_bad_rows=skip
        ds = read_table(file, cfg.format, on_bad_rows=cfg.on_bad_rows, skipped=malformed, quoting=cfg.quoting)
        columns = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
        grouped = [cfg.split_by] if cfg.split_by and path == cfg.train else []  # the file validation/test come from
        require_columns(ds, str(file), columns + ([cfg.label_column] if require_label else []) + grouped,
                        role={cfg.split_by: "data.split_by"} if grouped else None)
        known = set(self.labels) if self.labels else None
        rename = label_renames(cfg.label_map)

        def check(row: dict) -> tuple[str, str] | None:
            for column in columns:
                value = row[column]
                if not isinstance(value, str) or not value.strip():
                    return column, "empty text" if value is None or isinstance(value, str) else \
                        f"text must be a string, got {type(value).__name__}"
            if not require_label:
                return None
            if isinstance(row[cfg.label_column], dict):
                return cfg.label_column, "a label must be text or a number, got an object"
            if not multi and isinstance(row[cfg.label_column], list):
                return cfg.label_column, "a list of labels; set task.multi_label=true for texts with several labels"
            values = label_values(row[cfg.label_column], multi, cfg.label_separator, rename)
            if values is None:
                return cfg.label_column, "missing label"
            unknown = [v for v in values if known is not None and v not in known]
            if unknown:
                return cfg.label_column, f"unknown label {unknown[0]!r} (known: {', '.join(sorted(known))})"
            return None

        before = len(ds)
        ds, skipped = apply_row_checks(ds, str(file), check, cfg.on_bad_rows)
        if require_label and cfg.label_map and path == cfg.train:
            found = {v for cell in ds[cfg.label_column][:] for v in label_values(cell, multi, cfg.label_separator, {})}
            if problem := label_map_problem(found, cfg.label_map):
                raise DataError(str(file), problem, field=cfg.label_column)
            if unmapped := sorted(found - set(rename)):
                log.warning("labels not in data.label_map, kept as they are: %s", ", ".join(unmapped[:10]))

        def convert(batch: dict) -> dict:
            out: dict[str, Any] = {"_row": batch["_row"]}
            out["text"] = [self._clean(t) for t in batch[cfg.text_column]]
            if cfg.text_pair_column:
                out["text_pair"] = [self._clean(t) for t in batch[cfg.text_pair_column]]
            if cfg.split_by in batch:  # kept for splitting off validation/test by group
                out.setdefault(cfg.split_by, batch[cfg.split_by])
            if require_label:
                out["labels"] = [label_values(v, multi, cfg.label_separator, rename)
                                 for v in batch[cfg.label_column]]
                if not multi:  # a scalar copy of the label to stratify splits on
                    out["label_key"] = [v[0] for v in out["labels"]]
            return out

        ds = ds.map(convert, batched=True, remove_columns=ds.column_names)
        return ds, before - len(ds) + len(malformed), malformed + skipped

    def _clean(self, text: str) -> str:
        return html.unescape(text).strip() if self.data.unescape_html else text.strip()

    def load_splits(self, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read, check and split the configured files; returns the splits and a report for metrics.json."""
        cfg = self.data
        if not cfg.train:
            raise DataError("data.train", "no training file given (set data.train)")
        report: dict[str, Any] = {"skipped_rows": {}, "skipped_examples": []}
        train, n_skipped, messages = self._read(cfg.train)
        report["skipped_rows"]["train"] = n_skipped
        report["skipped_examples"] += messages[:20]
        if not self.labels:
            self.labels = sort_labels({v for labels in train["labels"][:] for v in labels})

        def read(name: str, path: str) -> Any:
            ds, n_skipped, messages = self._read(path)
            report["skipped_rows"][name] = n_skipped
            report["skipped_examples"] += messages[:20]
            return ds

        train, splits = carve_splits(train, cfg, seed, read, report, self._stratum)
        for name in list(splits):
            overlap = count_overlap(train["text"][:], splits[name]["text"][:])
            report.setdefault("overlap_with_train", {})[name] = overlap
            if overlap:
                log.warning("%d of %d %s texts also occur in the training data: %s scores may be optimistic",
                            overlap, len(splits[name]), name, name)
        splits["train"] = train
        report["rows"] = {k: len(v) for k, v in splits.items()}
        report["labels"] = self.labels
        report["label_counts"] = {k: self._counts(v) for k, v in splits.items()}
        if cfg.split_by:
            report["groups"] = listed_groups(splits, cfg.split_by)
        self.counts, self.rows = report["label_counts"]["train"], len(train)
        if not self.options.multi_label:
            self.majority = max(report["label_counts"]["train"].items(), key=lambda kv: kv[1])[0]
        return splits, report

    def _stratum(self, ds: Any) -> str | None:
        if self.options.multi_label:
            return None  # multi-label rows have no single class to stratify on
        return "label_key" if "label_key" in ds.column_names else None

    def _counts(self, ds: Any) -> dict[str, int]:
        counts = {name: 0 for name in self.labels}
        for labels in ds["labels"][:]:
            for name in labels:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def load_eval_file(self, path: str) -> Any:
        ds, _, _ = self._read(path)
        return ds

    def from_texts(self, records: list[Any]) -> Any:
        """Inputs for prediction: strings, or dicts with `text` (and `text_pair`)."""
        rows = [r if isinstance(r, dict) else {"text": r} for r in records]
        for i, row in enumerate(rows, 1):
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise no_text(row, i)
        columns = {"text": [self._clean(r["text"]) for r in rows]}
        if self.data.text_pair_column:  # the model was trained on pairs: each input needs its second text
            for i, row in enumerate(rows, 1):
                if not isinstance(row.get("text_pair"), str) or not row["text_pair"].strip():
                    raise DataError("input", "no `text_pair` (this model classifies text pairs: give each input "
                                    "`text` and `text_pair`)", row=i, field="text_pair")
            columns["text_pair"] = [self._clean(r["text_pair"]) for r in rows]
        return in_memory(columns)

    # ---- model -----------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {name: i for i, name in enumerate(self.labels)},
                "problem_type": "multi_label_classification" if self.options.multi_label
                else "single_label_classification"}

    @property
    def auto_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    # ---- features --------------------------------------------------------------------------------
    def encode(self, ds: Any, tokenizer: Any, max_length: int) -> Any:
        index = {name: i for i, name in enumerate(self.labels)}
        multi = self.options.multi_label

        def tokenize(batch: dict) -> dict:
            enc = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            if "labels" not in batch:  # prediction: say which inputs were cut to the model's length
                full = [i for i, n in enumerate(enc["length"]) if n >= max_length]
                whole = tokenizer([batch["text"][i] for i in full], [batch["text_pair"][i] for i in full]
                                  if "text_pair" in batch else None)["input_ids"] if full else []
                cut = {i for i, ids in zip(full, whole) if len(ids) > max_length}
                enc["truncated"] = [i in cut for i in range(len(enc["length"]))]
            if "labels" in batch:
                if multi:
                    enc["labels"] = [[float(n in set(v)) for n in self.labels] for v in batch["labels"]]
                else:
                    enc["labels"] = [index[v[0]] for v in batch["labels"]]
            return enc

        return mapped(ds, tokenize, tokenized(ds, tokenizer, max_length, self.labels, self.options))

    def collate(self, tokenizer: Any, pad_to_multiple_of: int, max_width: int | None = None) -> Any:
        multi = self.options.multi_label

        def collate(rows: list[dict]) -> dict:
            batch = pad_inputs(rows, tokenizer, pad_to_multiple_of, max_width=max_width)
            if "labels" in rows[0]:
                batch["labels"] = torch.tensor([r["labels"] for r in rows],
                                               dtype=torch.float32 if multi else torch.long)
            return batch

        return collate

    # ---- outputs ---------------------------------------------------------------------------------
    def sample_weights(self, features: Any) -> Any:
        """1 / its class's rows, for each row: every class drawn equally often on average."""
        labels = np.asarray(features["labels"][:])
        return (1.0 / np.bincount(labels, minlength=len(self.labels)).clip(min=1))[labels]

    def weighted_loss(self, weights: Any, label_smoothing: float) -> Any:
        """Cross-entropy with a weight per class (multi-label: BCE with a positive weight per label)."""
        rows = sum(self.counts.values()) if not self.options.multi_label else self.rows
        counts = np.array([max(self.counts.get(name, 0), 1) for name in self.labels], dtype=np.float64)
        if weights == "balanced":
            w = (rows - counts) / counts if self.options.multi_label else rows / (len(self.labels) * counts)
        else:
            if unknown := sorted(set(weights) - set(self.labels)):
                raise DataError("train.class_weights", f"unknown label(s) {', '.join(map(repr, unknown))} (labels: "
                                f"{', '.join(self.labels)})")
            w = np.array([float(weights.get(name, 1.0)) for name in self.labels])
        log.info("class weights: %s", ", ".join(f"{n} {x:.3g}" for n, x in zip(self.labels, w)))
        weight = torch.tensor(w, dtype=torch.float32)

        def loss(outputs: Any, batch: dict) -> torch.Tensor:
            logits = outputs.logits.float()
            if self.options.multi_label:
                return torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, batch["labels"].float(), pos_weight=weight.to(logits.device))
            return torch.nn.functional.cross_entropy(logits, batch["labels"], weight=weight.to(logits.device),
                                                     label_smoothing=label_smoothing)
        return loss

    def restore(self, config: Any) -> None:
        super().restore(config)  # the head
        self.temperature = getattr(config, "lmtune_temperature", None) or 1.0  # eval.calibrate's
        self.thresholds = getattr(config, "lmtune_thresholds", None)  # task.threshold: tune

    @property
    def cut(self) -> Any:
        """Multi-label: the probability at which each label is predicted."""
        if self.thresholds is not None:
            return np.asarray(self.thresholds)
        return 0.5 if self.options.threshold == "tune" else self.options.threshold

    def tune(self, session: Any, features: Any) -> dict[str, Any] | None:
        """task.threshold: tune: each label's threshold chosen on the validation rows (its best F1; ties: the one
        nearest 0.5), set here and saved in the model's config."""
        if not self.options.multi_label or self.options.threshold != "tune" or features is None:
            return None
        from lmtune.models import base_model_config

        probs = 1 / (1 + np.exp(-self.logits(session.outputs(features), len(features))))
        self.thresholds = chosen = best_thresholds(probs, np.asarray(features["labels"][:]).astype(bool))
        base_model_config(session.model).lmtune_thresholds = chosen
        return {"thresholds": dict(zip(self.labels, chosen))}

    def logits(self, outputs: Iterable[tuple[list[int], Any, dict]], n: int) -> np.ndarray:
        """The model's logits for all n rows (before any temperature)."""
        temperature, self.temperature = self.temperature, 1.0
        try:
            return self._collect(outputs, n)[0]
        finally:
            self.temperature = temperature

    def _collect(self, outputs: Iterable[tuple[list[int], Any, dict]], n: int) -> tuple[np.ndarray, float | None]:
        """Logits of all n rows divided by the temperature, and the mean loss (the model's, as trained)."""
        logits = np.zeros((n, len(self.labels)), dtype=np.float32)
        loss_sum, count = 0.0, 0
        for indices, out, _ in outputs:
            logits[indices] = out.logits.float().cpu().numpy()
            if getattr(out, "loss", None) is not None:
                loss_sum += float(out.loss) * len(indices)
                count += len(indices)
        return logits / self.temperature, (loss_sum / count if count else None)

    def evaluate(self, outputs: Iterable, features: Any, examples: Any = None
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        """Scalar metrics (logged at every evaluation) and details (per-class table, confusion matrix; with
        `examples`, the most confident wrong predictions)."""
        logits, loss = self._collect(outputs, len(features))
        gold = np.asarray(features["labels"][:])
        probs = 1 / (1 + np.exp(-logits)) if self.options.multi_label else softmax(logits)
        calibrated, reliability = calibration(probs, gold, self.options.multi_label)
        k = len(self.labels)
        if self.options.multi_label:
            pred = (probs >= self.cut).astype(int)
            gold = gold.astype(int)
            scalars = {"micro_f1": micro_f1(gold, pred, k), "macro_f1": macro_f1(gold, pred, k),
                       "subset_accuracy": float((gold == pred).all(1).mean())}
            details: dict[str, Any] = {}
        else:
            pred = logits.argmax(-1)
            # Macro-F1 over the classes in gold or predictions (sklearn's default, as the HF scripts report it): a
            # class absent from both is not a 0 in the mean.
            scalars = {"accuracy": float((gold == pred).mean()), "macro_f1": macro_f1(gold, pred, k)}
            details = {"confusion_matrix": confusion(gold, pred, k).tolist()}
            if self.majority is not None:  # what always answering the most frequent training label scores
                constant = np.full_like(gold, self.labels.index(self.majority))
                details["majority_baseline"] = {
                    "label": self.majority, "accuracy": float((gold == constant).mean()),
                    "macro_f1": macro_f1(gold, constant, k)}
        tp, predicted, support = label_counts(gold, pred, k)
        p, r, f = prf(tp, predicted, support)
        details["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                       "support": int(support[i])} for i, name in enumerate(self.labels)}
        details["labels"] = self.labels
        scalars.update(calibrated)
        details["reliability"] = reliability
        if examples is not None:
            details["mistakes"] = self._mistakes(logits, gold, examples)
        if loss is not None:
            scalars["loss"] = loss
        return {k: float(v) for k, v in scalars.items()}, details

    def _mistakes(self, logits: np.ndarray, gold: np.ndarray, examples: Any) -> list[dict[str, Any]]:
        """The MISTAKES most confident wrong predictions: single-label, by the probability of the wrong class;
        multi-label, by the probability furthest from a gold label's 0 or 1."""
        if self.options.multi_label:
            probs = 1 / (1 + np.exp(-logits))
            error = np.abs(probs - gold)
            wrong = np.flatnonzero(((probs >= self.cut) != gold.astype(bool)).any(1))
            worst = wrong[np.argsort(-error[wrong].max(1), kind="stable")][:MISTAKES]
            shown = [{"gold": [self.labels[j] for j in np.flatnonzero(gold[i])],
                      "predicted": [self.labels[j] for j in np.flatnonzero(probs[i] >= self.cut)],
                      "score": float(error[i].max())} for i in worst]
        else:
            probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
            pred = probs.argmax(-1)
            wrong = np.flatnonzero(pred != gold)
            worst = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:MISTAKES]
            shown = [{"gold": self.labels[gold[i]], "predicted": self.labels[pred[i]],
                      "score": float(probs[i, pred[i]])} for i in worst]
        rows = examples.select(worst.tolist())
        pairs = rows["text_pair"][:] if "text_pair" in rows.column_names else [None] * len(rows)
        return [{"row": int(i), "text": text, **({"text_pair": pair} if pair is not None else {}), **found}
                for i, text, pair, found in zip(worst, rows["text"][:], pairs, shown)]

    def postprocess(self, outputs: Iterable, n: int) -> list[dict[str, Any]]:
        logits, _ = self._collect(outputs, n)
        if self.options.multi_label:
            probs = 1 / (1 + np.exp(-logits))
            return [{"labels": [self.labels[j] for j in np.flatnonzero(p >= self.cut)],
                     "scores": {name: round(float(p[j]), 6) for j, name in enumerate(self.labels)}} for p in probs]
        probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
        return [{"label": self.labels[int(p.argmax())], "score": round(float(p.max()), 6),
                 "scores": {name: round(float(p[j]), 6) for j, name in enumerate(self.labels)}} for p in probs]
