"""Named entity recognition: word tags aligned to sub-tokens, long sentences in windows, seqeval scores, spans."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

from lmtune.errors import ConfigError
from lmtune.data import DataError, carve_splits, count_overlap, listed_groups, no_text, pad_inputs
from lmtune.data.conll import NerReadOptions, read_ner, tag_types
from lmtune.registry import register_task
from lmtune.evaluation.entities import entity_scores
from lmtune.data.fingerprint import in_memory, mapped, tokenized
from lmtune.tasks.base import MISTAKES, Task
from lmtune.tasks.ner_words import (_TAG_NAME, align_labels, owned_ranges, spells_leading_spaces, split_long,
                                    split_words, tag_names)

if TYPE_CHECKING:
    from lmtune.config import DataConfig

log = logging.getLogger("lmtune")

class NerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: Literal["ner"] = "ner"
    """Tag every word of a sentence with its entity type (named entity recognition, token classification)."""
    tag_scheme: Literal["bio", "iob1", "bioes"] = "bio"
    """Tags in the files: bio (IOB2: B- starts every entity), iob1 (the original CoNLL-2003) or bioes."""
    token_column: int = 0
    """CoNLL column files: index of the column holding the token (0 = first; negative counts from the end)."""
    tag_column: int = -1
    """CoNLL column files: index of the column holding the entity tag (-1 = last)."""
    tokens_field: str = "tokens"
    """JSONL/JSON/Parquet records: the field holding the list of tokens."""
    tags_field: str = "tags"
    """JSONL/JSON/Parquet records: the field holding the list of tags."""
    label_all_subtokens: bool = False
    """Train on every sub-token of a word (B- turns I- after the first), not the first only; scoring stays per word."""
    stride: int | None = None
    """Sentences longer than model.max_length are cut into windows sharing up to this many sub-tokens of context;
    default: a quarter of a window."""
    strict: bool = False
    """Score and read entities in seqeval's strict mode (IOB2): an entity must start with B- to count."""

    @model_validator(mode="after")
    def _check(self) -> "NerOptions":
        if self.stride is not None and self.stride < 0:
            raise ValueError(f"task.stride={self.stride}: must be 0 or more")
        return self


def _predict_input(record: Any, row: int) -> dict[str, Any]:
    """A predict input (raw text, or {"tokens": [...]} with an optional "text") as words with char spans."""
    if isinstance(record, dict) and "tokens" in record:
        tokens = record["tokens"]
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
            raise DataError("input", "tokens must be a non-empty list of non-empty strings", row=row, field="tokens")
        text = record.get("text") if isinstance(record.get("text"), str) else " ".join(tokens)
        spans, at = [], 0
        for i, token in enumerate(tokens):
            start = text.find(token, at)
            if start < 0:
                raise DataError("input", f"token {i} {token!r} is not in the text after character {at}", row=row,
                                field="tokens")
            spans.append((start, start + len(token)))
            at = start + len(token)
        return {"text": text, "tokens": tokens, "spans": spans}
    text = record.get("text") if isinstance(record, dict) else record
    if not isinstance(text, str) or not text.strip():
        raise no_text(record, row)
    tokens, spans = split_words(text)
    return {"text": text, "tokens": tokens, "spans": spans}


@register_task("ner")
class Ner(Task):
    pipeline_tag = "token-classification"
    Options = NerOptions
    default_metric = "f1"
    metric_names = ("f1", "precision", "recall", "token_accuracy", "loss")
    cross_entropy_targets = [("logits", "labels")]

    @staticmethod
    def count_targets(batch: dict) -> Any:
        """Words the loss averages over: each word's first sub-token carries its tag, the rest -100."""
        return (batch["labels"] != -100).sum()

    def __init__(self, options: NerOptions, data: DataConfig, labels: list[str] | None = None):
        self.options = options
        self.data = data
        given = data.labels
        if not labels and given:  # data.labels: the tags in index order, or just the entity types
            labels = list(given) if "O" in given and all(_TAG_NAME.match(g) for g in given) else tag_names(given)
        self.labels = labels
        # postprocess sees only model outputs: the words and windows of the current predict call are kept here
        self._predict: tuple[Any, list[dict]] | None = None
        self._encoded: tuple[Any, Any] | None = None
        self._pad_left = False

    @property
    def types(self) -> list[str]:
        return [name[2:] for name in self.labels or [] if name.startswith("B-")]

    @staticmethod
    def greater_is_better(metric: str) -> bool:
        return "loss" not in metric

    # ---- data ------------------------------------------------------------------------------------
    def _read(self, path: str, report: dict[str, Any] | None = None, split: str = "") -> Any:
        o = self.options
        opts = NerReadOptions(scheme=o.tag_scheme, token_column=o.token_column, tag_column=o.tag_column,
                              tokens_field=o.tokens_field, tags_field=o.tags_field, format=self.data.format,
                              on_bad_rows=self.data.on_bad_rows, types=set(self.types) if self.labels else None,
                              group_field=self.data.split_by if split == "train" else None)
        ds, skipped, messages = read_ner(path, opts)
        if report is not None:
            report["skipped_rows"][split] = skipped
            report["skipped_examples"] += messages[:20]
        return ds

    def load_splits(self, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read, check and split the configured files; returns the splits and a report for metrics.json."""
        cfg = self.data
        if not cfg.train:
            raise DataError("data.train", "no training file given (set data.train)")
        report: dict[str, Any] = {"skipped_rows": {}, "skipped_examples": [], "tag_scheme": self.options.tag_scheme}
        train = self._read(cfg.train, report, "train")
        if not self.labels:
            types = sorted(set().union(*map(tag_types, train["tags"][:])))
            if not types:
                raise DataError(cfg.train, "no entity tags: every tag is O (is task.tag_column the tag column?)")
            self.labels = tag_names(types)
        # Split off by whole groups with data.split_by (CoNLL: "document"), else by sentence; a sentence has no
        # single label to stratify on: splits and subsets are seeded random samples.
        train, splits = carve_splits(train, cfg, seed, lambda name, path: self._read(path, report, name), report)
        texts = [" ".join(tokens) for tokens in train["tokens"][:]]
        for name in list(splits):
            overlap = count_overlap(texts, [" ".join(t) for t in splits[name]["tokens"][:]])
            report.setdefault("overlap_with_train", {})[name] = overlap
            if overlap:
                log.warning("%d of %d %s sentences also occur in the training data: %s scores may be optimistic",
                            overlap, len(splits[name]), name, name)
        splits["train"] = train
        report["rows"] = {k: len(v) for k, v in splits.items()}
        report["tokens"] = {k: sum(map(len, v["tokens"][:])) for k, v in splits.items()}
        report["labels"] = self.labels
        report["entities"] = {k: self._count(v) for k, v in splits.items()}
        if cfg.split_by:
            report["groups"] = listed_groups(splits, cfg.split_by)
        return splits, report

    def _count(self, ds: Any) -> dict[str, int]:
        counts = {kind: 0 for kind in self.types}
        for tags in ds["tags"][:]:
            for tag in tags:
                if tag.startswith("B-"):
                    counts[tag[2:]] = counts.get(tag[2:], 0) + 1
        return counts

    def load_eval_file(self, path: str) -> Any:
        return self._read(path)

    def from_texts(self, records: list[Any]) -> Any:
        """Inputs for prediction: raw texts (split into words here) or dicts with `tokens` (and `text`)."""
        import datasets

        inputs = [_predict_input(record, i) for i, record in enumerate(records, 1)]
        strings = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string"))})  # typed even when empty
        ds = in_memory({"tokens": [x["tokens"] for x in inputs]}, features=strings)
        self._predict = (ds, inputs)
        return ds

    # ---- model -----------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {name: i for i, name in enumerate(self.labels)}}

    @property
    def auto_class(self) -> Any:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    # ---- features --------------------------------------------------------------------------------
    def _window(self, tokenizer: Any, max_length: int) -> tuple[int, int]:
        """Sub-tokens of a sentence per window, and those shared by consecutive windows."""
        budget = max_length - tokenizer.num_special_tokens_to_add()
        return budget, budget // 4 if self.options.stride is None else self.options.stride

    def config_problem(self, tokenizer: Any, max_length: int) -> str | None:
        """Windows over a long sentence must advance: the stride under half a window."""
        budget, stride = self._window(tokenizer, max_length)
        if 2 * stride < budget:
            return None
        return (f"task.stride={stride} must be under half of a window: {budget} sub-tokens "
                f"(model.max_length={max_length} less special tokens)")

    def encode(self, ds: Any, tokenizer: Any, max_length: int) -> Any:
        """One feature row per window (one window unless a sentence is longer than max_length)."""
        problem = self.config_problem(tokenizer, max_length)
        if problem:
            raise ConfigError(problem)
        budget, stride = self._window(tokenizer, max_length)
        index = {name: i for i, name in enumerate(self.labels)}
        # B-X on a word's later sub-tokens would claim a second entity: they learn I-X (as run_ner.py does).
        inside = [index.get("I-" + name[2:], i) if name.startswith("B-") else i for name, i in index.items()]
        labelled = "tags" in ds.column_names
        all_subtokens = self.options.label_all_subtokens

        spaced = spells_leading_spaces(tokenizer)
        # Where " 1996" becomes a lone space token and digits (SmolLM2, Llama 3), the space belongs to no word: the
        # word's first sub-token, which carries its tag and its prediction, is then its first digit.
        space = tokenizer(" ", add_special_tokens=False)["input_ids"] if spaced else []
        space = space[0] if len(space) == 1 else None

        def tokenize(batch: dict, indices: list[int]) -> dict:
            sentences = [[" " + w for w in words] for words in batch["tokens"]] if spaced else batch["tokens"]
            full = tokenizer(sentences, is_split_into_words=True, truncation=False)
            out: dict[str, list] = {}
            for j, (words, sentence) in enumerate(zip(sentences, indices)):
                word_ids = full.word_ids(j)
                if len(word_ids) <= max_length:
                    windows = [((0, len(words)), {k: full[k][j] for k in full.keys()}, word_ids)]
                else:
                    windows = split_long(words, word_ids, tokenizer, max_length, budget, stride)
                tag_ids = [index[t] for t in batch["tags"][j]] if labelled else None
                owned = owned_ranges([w for w, _, _ in windows])
                for (_, enc, ids), (lo, hi) in zip(windows, owned):
                    ids = [None if t == space else w for w, t in zip(ids, enc["input_ids"])]
                    row = {**enc, "length": len(ids), "sentence": sentence, "own_start": lo, "own_end": hi,
                           "word_ids": [-1 if w is None else w for w in ids]}
                    if labelled:
                        row["labels"] = align_labels(ids, tag_ids, inside, all_subtokens)
                        row["word_tags"] = tag_ids[lo:hi]
                    for key, value in row.items():
                        out.setdefault(key, []).append(value)
            return out

        features = mapped(ds, tokenize, tokenized(ds, tokenizer, max_length, self.labels, self.options),
                          with_indices=True)
        if len(features) > len(ds):
            long = int((np.bincount(features["sentence"][:]) > 1).sum())
            log.info("%d sentences are longer than %d sub-tokens: cut into overlapping windows (%d rows for %d "
                     "sentences)", long, max_length, len(features), len(ds))
        if self._predict is not None and ds is self._predict[0]:
            self._encoded = (ds, features)
        return features

    def collate(self, tokenizer: Any, pad_to_multiple_of: int, max_width: int | None = None) -> Any:
        self._pad_left = tokenizer.padding_side == "left"

        def collate(rows: list[dict]) -> dict:
            batch = pad_inputs(rows, tokenizer, pad_to_multiple_of, max_width=max_width)
            if "labels" in rows[0]:
                width = batch["input_ids"].shape[1]
                labels = torch.full((len(rows), width), -100, dtype=torch.long)
                for i, r in enumerate(rows):
                    at = width - len(r["labels"]) if self._pad_left else 0
                    labels[i, at:at + len(r["labels"])] = torch.tensor(r["labels"])
                batch["labels"] = labels
            return batch

        return collate

    # ---- outputs ---------------------------------------------------------------------------------
    def _word_predictions(self, outputs: Iterable, features: Any) -> tuple[list, list, float | None]:
        """Per sentence: the predicted tag id and its probability for every word (from the first sub-token,
        in the window that owns the word), and the mean loss when the model returned one."""
        meta = features.select_columns(["sentence", "own_start", "own_end", "word_ids"]).to_dict()
        n_words = np.zeros(max(meta["sentence"], default=-1) + 1, dtype=np.int64)
        np.maximum.at(n_words, meta["sentence"], meta["own_end"])
        # Words without sub-tokens (characters the tokenizer drops) keep O: they are still scored.
        pred = [np.full(n, self.labels.index("O"), dtype=np.int64) for n in n_words]
        score = [np.ones(n, dtype=np.float32) for n in n_words]
        loss_sum, count = 0.0, 0
        for indices, out, batch in outputs:
            best, arg = torch.softmax(out.logits.float(), dim=-1).max(dim=-1)
            best, arg = best.cpu().numpy(), arg.cpu().numpy()
            for b, r in enumerate(indices):
                wid = np.asarray(meta["word_ids"][r])
                at = arg.shape[1] - len(wid) if self._pad_left else 0
                first = wid != np.concatenate(([-2], wid[:-1]))
                keep = first & (wid >= meta["own_start"][r]) & (wid < meta["own_end"][r])
                positions = np.flatnonzero(keep) + at
                sentence = meta["sentence"][r]
                pred[sentence][wid[keep]] = arg[b, positions]
                score[sentence][wid[keep]] = best[b, positions]
            if getattr(out, "loss", None) is not None:  # a mean over the batch's tagged words: weighted by them
                words = int(self.count_targets(batch))
                loss_sum += float(out.loss) * words
                count += words
        return pred, score, (loss_sum / count if count else None)

    def _gold(self, features: Any, n: int) -> list[list[int]]:
        meta = features.select_columns(["sentence", "word_tags"]).to_dict()
        gold: list[list[int]] = [[] for _ in range(n)]
        for sentence, tags in zip(meta["sentence"], meta["word_tags"]):
            gold[sentence].extend(tags)  # a sentence's windows are consecutive rows, in word order
        return gold

    def evaluate(self, outputs: Iterable, features: Any, examples: Any = None
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        """Entity-level micro precision/recall/F1 (seqeval) and token accuracy, all per word; per-type table; with
        `examples`, the sentences with the most wrong entities."""
        pred, _, loss = self._word_predictions(outputs, features)
        gold = self._gold(features, len(pred))
        y_true = [[self.labels[i] for i in g] for g in gold]
        y_pred = [[self.labels[i] for i in p] for p in pred]
        micro, per_type = entity_scores(y_true, y_pred, self.types, self.options.strict)
        scalars = {k: micro[k] for k in ("f1", "precision", "recall")}
        gold_ids = np.concatenate([np.asarray(g, dtype=np.int64) for g in gold]) if gold else np.zeros(0, np.int64)
        pred_ids = np.concatenate(pred) if pred else np.zeros(0, np.int64)
        scalars["token_accuracy"] = float((pred_ids == gold_ids).mean()) if len(gold_ids) else 0.0
        if loss is not None:
            scalars["loss"] = loss
        details = {"per_type": per_type, "labels": self.labels, "mode": "strict" if self.options.strict else "default",
                   "sentences": len(gold), "words": int(sum(map(len, gold)))}
        if examples is not None:
            details["mistakes"] = self._mistakes(y_true, y_pred, examples)
        return {k: float(v) for k, v in scalars.items()}, details

    def _mistakes(self, y_true: list[list[str]], y_pred: list[list[str]], examples: Any) -> list[dict[str, Any]]:
        """The MISTAKES sentences with the most entities missed or wrongly found (as the metrics read entities)."""
        found = []
        for i, (gold, pred) in enumerate(zip(y_true, y_pred)):
            gold_set, pred_set = set(self._entities(gold)), set(self._entities(pred))
            if gold_set != pred_set:
                found.append((len(gold_set ^ pred_set), i, gold_set - pred_set, pred_set - gold_set))
        found.sort(key=lambda f: (-f[0], f[1]))
        out = []
        for _, i, missed, spurious in found[:MISTAKES]:
            tokens = examples[i]["tokens"]

            def shown(entities: set) -> list[dict[str, Any]]:
                return [{"type": kind, "text": " ".join(tokens[start:end]), "start": start, "end": end}
                        for kind, start, end in sorted(entities, key=lambda e: (e[1], e[0]))]
            out.append({"row": i, "tokens": tokens, "gold": y_true[i], "predicted": y_pred[i],
                        "missed": shown(missed), "spurious": shown(spurious)})
        return out

    def _entities(self, tags: list[str]) -> list[tuple[str, int, int]]:
        """(type, first word, end word exclusive) of each entity, read as the metrics read them."""
        if self.options.strict:
            from seqeval.scheme import IOB2, Entities

            return [(e.tag, e.start, e.end) for e in Entities([tags], IOB2).entities[0]]
        from seqeval.metrics.sequence_labeling import get_entities

        return [(kind, start, end + 1) for kind, start, end in get_entities(tags)]

    def postprocess(self, outputs: Iterable, n: int) -> list[dict[str, Any]]:
        """Entity spans per input: type, character offsets into its text, text and mean word probability."""
        if self._predict is None or self._encoded is None or self._encoded[0] is not self._predict[0]:
            raise RuntimeError("NER postprocess needs the features of encode(from_texts(...)) of the same call")
        inputs, features = self._predict[1], self._encoded[1]
        pred, score, _ = self._word_predictions(outputs, features)
        results = []
        for x, ids, probs in zip(inputs, pred, score):
            tags = [self.labels[i] for i in ids]
            entities = []
            for kind, first, end in self._entities(tags):
                start, stop = x["spans"][first][0], x["spans"][end - 1][1]
                entities.append({"type": kind, "start": start, "end": stop, "text": x["text"][start:stop],
                                 "score": round(float(probs[first:end].mean()), 6),
                                 "token_start": first, "token_end": end})
            results.append({"entities": entities, "tokens": x["tokens"], "tags": tags})
        return results
