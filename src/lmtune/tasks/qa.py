"""Extractive question answering: SQuAD-style data, overlapping windows over long contexts, spans, EM/F1."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

from lmtune.errors import ConfigError
from lmtune.data import DataError, carve_splits, count_overlap, listed_groups, pad_inputs
from lmtune.data.squad import COLUMNS, read_squad
from lmtune.data.fingerprint import in_memory, mapped, tokenized
from lmtune.evaluation.squad import best_no_answer_threshold, excerpt, score, squad_metrics
from lmtune.registry import register_task
from lmtune.tasks.base import MISTAKES, Task

if TYPE_CHECKING:
    from lmtune.config import DataConfig

log = logging.getLogger("lmtune")


class QAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: Literal["qa"] = "qa"
    """Extractive question answering: answer a question with a span of its context (SQuAD)."""
    doc_stride: int = 128
    """Tokens shared by consecutive windows when a context does not fit in one window of model.max_length."""
    max_question_length: int = 64
    """Questions longer than this many tokens are cut (with a warning) so that a window holds some context."""
    max_answer_length: int = 30
    """Longest answer considered, in tokens."""
    n_best: int = 20
    """Start and end candidates per window considered when choosing the answer span."""
    version_2: bool = False
    """Questions may have no answer in their context (SQuAD v2.0); the model may then answer "no answer"."""
    no_answer_threshold: float = 0.0
    """Version 2: answer "no answer" when its score beats the best span's by more than this (see best_f1_threshold)."""

    @model_validator(mode="after")
    def _check(self) -> "QAOptions":
        for name in ("max_question_length", "max_answer_length", "n_best"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)}: must be at least 1")
        if self.doc_stride < 0:
            raise ValueError(f"task.doc_stride={self.doc_stride}: must be 0 or more")
        return self


@register_task("qa")
class QuestionAnswering(Task):
    pipeline_tag = "question-answering"
    Options = QAOptions
    default_metric = "f1"
    # The models' own loss is the mean of start and end cross-entropy; positions always lie in the window.
    cross_entropy_targets = [("start_logits", "start_positions"), ("end_logits", "end_positions")]

    @property
    def metric_names(self) -> tuple[str, ...]:
        # has_answer_* / no_answer_* are logged only when the validation data holds both kinds of question:
        # not known before training, so they select no checkpoint.
        no_answer = ("best_f1", "best_f1_threshold", "best_exact", "best_exact_threshold")
        return ("exact_match", "f1", "loss", *(no_answer if self.options.version_2 else ()))

    def __init__(self, options: QAOptions, data: DataConfig, labels: list[str] | None = None):
        self.options = options
        self.data = data  # labels (a saved model's id2label) mean nothing for span prediction
        self._encoded: Any = None  # the last unlabelled features, which postprocess turns into answers

    @staticmethod
    def greater_is_better(metric: str) -> bool:
        return "loss" not in metric

    # ---- data ------------------------------------------------------------------------------------
    def _read(self, path: str) -> tuple[Any, list[str]]:
        split_by = self.data.split_by
        keep = (split_by,) if split_by and split_by not in COLUMNS else ()
        return read_squad(path, self.data.format, on_bad_rows=self.data.on_bad_rows,
                          allow_impossible=self.options.version_2, keep=keep)

    def load_splits(self, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read, check and split the configured files; returns the splits and a report for metrics.json."""
        cfg = self.data
        if not cfg.train:
            raise DataError("data.train", "no training file given (set data.train)")
        report: dict[str, Any] = {"skipped_rows": {}, "skipped_examples": []}

        def read(name: str, path: str) -> Any:
            ds, skipped = self._read(path)
            report["skipped_rows"][name] = len(skipped)
            report["skipped_examples"] += skipped[:20]
            return ds

        train = read("train", cfg.train)
        train, splits = carve_splits(train, cfg, seed, read, report)
        for name in list(splits):
            # Questions about a context seen in training are easier: count them, as classification
            # counts repeated texts.
            overlap = count_overlap(train["context"][:], splits[name]["context"][:])
            report.setdefault("overlap_with_train", {})[name] = overlap
            if overlap:
                log.warning("%d of %d %s questions ask about a context that is also in the training data; "
                            "set data.split_by (e.g. title) to keep contexts apart", overlap, len(splits[name]), name)
        splits["train"] = train
        report["rows"] = {k: len(v) for k, v in splits.items()}
        report["unanswerable"] = {k: int(sum(v["is_impossible"][:])) for k, v in splits.items()}
        if cfg.split_by:
            report["groups"] = listed_groups(splits, cfg.split_by)
        return splits, report

    def load_eval_file(self, path: str) -> Any:
        return self._read(path)[0]

    def from_texts(self, records: list[Any]) -> Any:
        """Inputs for prediction: dicts with `question` and `context`, or (question, context) pairs."""
        questions, contexts = [], []
        for i, record in enumerate(records, 1):
            if isinstance(record, dict):
                pair = record.get("question"), record.get("context")
            elif isinstance(record, (list, tuple)) and len(record) == 2:
                pair = tuple(record)
            else:
                raise DataError("input", "expected {question, context} or a (question, context) pair", row=i)
            for field, value in zip(("question", "context"), pair):
                if not isinstance(value, str) or not value.strip():
                    raise DataError("input", f"empty or missing {field}", row=i, field=field)
            questions.append(pair[0])
            contexts.append(pair[1])
        return in_memory({"id": [str(i) for i in range(1, len(records) + 1)], "question": questions,
                          "context": contexts})

    # ---- model -----------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def auto_class(self) -> Any:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    # ---- features --------------------------------------------------------------------------------
    def config_problem(self, tokenizer: Any, max_length: int) -> str | None:
        """Windows must advance through a long context: doc_stride below the room a question leaves in a window."""
        opts = self.options
        room = max_length - opts.max_question_length - tokenizer.num_special_tokens_to_add(pair=True)
        if opts.doc_stride < room:
            return None
        return (f"task.doc_stride={opts.doc_stride} must be smaller than the context part of a window, {room} tokens "
                f"(model.max_length {max_length} - task.max_question_length {opts.max_question_length} - special "
                "tokens)")

    def encode(self, ds: Any, tokenizer: Any, max_length: int) -> Any:
        """One row per window: a context longer than a window is cut into windows of `max_length` tokens
        overlapping by `doc_stride`. Every window is kept, for training (those that do not hold the
        answer point at the CLS token, as for unanswerable questions) and for evaluation."""
        opts = self.options
        problem = self.config_problem(tokenizer, max_length)
        if problem:
            raise ConfigError(problem)
        labelled = "answer_texts" in ds.column_names
        features = mapped(ds, lambda batch, idx: self._windows(batch, idx, tokenizer, max_length),
                          tokenized(ds, tokenizer, max_length, self.options), with_indices=True)
        questions = tokenizer([q.lstrip() for q in ds["question"][:]], add_special_tokens=False, return_length=True)
        if cut := sum(n > opts.max_question_length for n in questions["length"]):  # not in the map: it may be cached
            log.warning("%d question(s) longer than task.max_question_length=%d tokens were cut", cut,
                        opts.max_question_length)
        if not labelled:
            self._encoded = features
        return features

    def _cap_questions(self, questions: list[str], tokenizer: Any) -> list[str]:
        limit = self.options.max_question_length
        enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
        capped = []
        for question, offsets in zip(questions, enc["offset_mapping"]):
            if len(offsets) > limit:
                question = question[:offsets[limit - 1][1]]
            capped.append(question)
        return capped

    def _windows(self, batch: dict, indices: list[int], tokenizer: Any, max_length: int) -> dict:
        # Tokenizers that pad on the left (XLNet-style) take the context first, so it is always the
        # context that gets truncated, as in Hugging Face's run_qa example.
        context_first = tokenizer.padding_side == "left"
        questions = self._cap_questions([q.lstrip() for q in batch["question"]], tokenizer)
        pair = (batch["context"], questions) if context_first else (questions, batch["context"])
        enc = tokenizer(*pair, truncation="only_first" if context_first else "only_second", max_length=max_length,
                        stride=self.options.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
        context_id = 0 if context_first else 1
        sample = enc.pop("overflow_to_sample_mapping")
        offsets = enc.pop("offset_mapping")
        out: dict[str, list] = {k: [] for k in ("example", "id", "context", "cls", "char_starts", "char_ends")}
        labelled = "answer_texts" in batch
        if labelled:
            out.update(golds=[], start_positions=[], end_positions=[])
        for w, ex in enumerate(sample):
            ids = enc["input_ids"][w]
            in_context = [s == context_id for s in enc.sequence_ids(w)]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            out["example"].append(indices[ex])
            out["id"].append(batch["id"][ex])
            out["context"].append(batch["context"][ex])
            out["cls"].append(cls)
            out["char_starts"].append([o[0] if c else -1 for o, c in zip(offsets[w], in_context)])
            out["char_ends"].append([o[1] if c else -1 for o, c in zip(offsets[w], in_context)])
            if labelled:
                texts, starts = batch["answer_texts"][ex], batch["answer_starts"][ex]
                out["golds"].append(texts)
                span = _answer_span(texts[0], starts[0]) if texts else None
                start, end = _token_span(offsets[w], in_context, span, cls)
                out["start_positions"].append(start)
                out["end_positions"].append(end)
        out.update(enc)
        out["length"] = [len(ids) for ids in enc["input_ids"]]
        return out

    def collate(self, tokenizer: Any, pad_to_multiple_of: int, max_width: int | None = None) -> Any:
        def collate(rows: list[dict]) -> dict:
            # Always padded on the right, so that token positions (labels, character offsets) are the
            # ones of the unpadded window whichever side the tokenizer pads.
            batch = pad_inputs(rows, tokenizer, pad_to_multiple_of, side="right", max_width=max_width)
            if "start_positions" in rows[0]:
                batch["start_positions"] = torch.tensor([r["start_positions"] for r in rows])
                batch["end_positions"] = torch.tensor([r["end_positions"] for r in rows])
            return batch

        return collate

    # ---- outputs ---------------------------------------------------------------------------------
    def _answers(self, outputs: Iterable, features: Any) -> tuple[list[dict[str, Any]], float | None]:
        """The best answer of every example across all its windows, and the mean loss (when labelled)."""
        starts: list[Any] = [None] * len(features)
        ends: list[Any] = [None] * len(features)
        loss_sum, count = 0.0, 0
        lengths = features["length"][:]
        for indices, out, _ in outputs:
            start_logits, end_logits = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for j, i in enumerate(indices):
                starts[i], ends[i] = start_logits[j, :lengths[i]], end_logits[j, :lengths[i]]
            if getattr(out, "loss", None) is not None:
                loss_sum += float(out.loss) * len(indices)
                count += len(indices)
        columns = ["example", "context", "cls", "char_starts", "char_ends"]
        table = features.select_columns(columns).with_format("arrow")[:]
        char_starts, char_ends = _ragged(table.column("char_starts")), _ragged(table.column("char_ends"))
        examples, contexts, cls = (table.column(c).to_pylist() for c in ("example", "context", "cls"))
        windows: dict[int, list[int]] = {}
        for w, ex in enumerate(examples):
            windows.setdefault(ex, []).append(w)
        answers = []
        for ex in sorted(windows):
            ws = windows[ex]
            null = min(starts[w][cls[w]] + ends[w][cls[w]] for w in ws)
            spans = _candidate_spans([(starts[w], ends[w], char_starts[w], char_ends[w]) for w in ws],
                                     self.options.n_best, self.options.max_answer_length)
            answers.append(self._choose(spans, float(null), contexts[ws[0]], first_window=ws[0]))
        return answers, (loss_sum / count if count else None)

    def _choose(self, spans: dict[tuple[int, int], float], null: float, context: str, first_window: int) -> dict:
        """The answer from the ranked spans: text, character span, probability among the candidates."""
        opts = self.options
        ranked = sorted(spans.items(), key=lambda kv: -kv[1])[:opts.n_best]
        scores = np.array([s for _, s in ranked] + ([null] if opts.version_2 else []), dtype=np.float64)
        probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum() if len(scores) else scores
        best = {"answer": "", "start": None, "end": None, "score": 0.0, "no_answer": True, "window": first_window}
        if ranked:
            (start, end), score = ranked[0]
            best.update(answer=context[start:end], start=start, end=end, score=float(probs[0]), no_answer=False)
        # null minus best span: above the threshold means "no answer" (the official SQuAD v2 recipe).
        best["score_diff"] = null - ranked[0][1] if ranked else 0.0  # no span at all: nothing to decide
        best["span"] = best["answer"]
        if opts.version_2 and best["score_diff"] > opts.no_answer_threshold:
            best.update(answer="", start=None, end=None, score=float(probs[-1]), no_answer=True)
        return best

    def evaluate(self, outputs: Iterable, features: Any, examples: Any = None
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        """SQuAD exact match and F1 (percent) over examples, the v2 breakdown and best no-answer threshold; with
        `examples`, the wrong answers (lowest F1, the most confident first)."""
        answers, loss = self._answers(outputs, features)
        golds = features["golds"][:]
        refs = [golds[a["window"]] for a in answers]
        metrics = squad_metrics([a["answer"] for a in answers], refs)
        names = {"exact_match": "exact_match", "f1": "f1", "HasAns_exact": "has_answer_exact",
                 "HasAns_f1": "has_answer_f1", "NoAns_exact": "no_answer_exact", "NoAns_f1": "no_answer_f1"}
        scalars = {new: float(metrics[old]) for old, new in names.items() if old in metrics}
        details: dict[str, Any] = {"examples": len(answers), "windows": len(features)}
        if self.options.version_2:
            spans, diffs = [a["span"] for a in answers], [a["score_diff"] for a in answers]
            for metric in ("f1", "exact_match"):
                threshold, value = best_no_answer_threshold(spans, refs, diffs, metric)
                key = "exact" if metric == "exact_match" else metric
                scalars[f"best_{key}"], scalars[f"best_{key}_threshold"] = value, threshold
            details["no_answer_threshold"] = self.options.no_answer_threshold
        if examples is not None:
            details["mistakes"] = self._mistakes(answers, refs, features, examples)
        if loss is not None:
            scalars["loss"] = loss
        return scalars, details

    def _mistakes(self, answers: list[dict], refs: list[list[str]], features: Any, examples: Any
                  ) -> list[dict[str, Any]]:
        """The MISTAKES worst answers: lowest F1 against the gold answers, the most confident first; the context
        cut to the words around the gold answer and the prediction."""
        ids, f1 = features["id"][:], [score(a["answer"], r)[1] for a, r in zip(answers, refs)]
        wrong = sorted((i for i, f in enumerate(f1) if f < 1), key=lambda i: (f1[i], -answers[i]["score"], i))
        out = []
        for i in wrong[:MISTAKES]:
            a, row = answers[i], examples[i]
            starts = [s for s in [*(row.get("answer_starts") or []), a["start"]] if s is not None and s >= 0]
            out.append({"row": i, "id": ids[a["window"]], "question": row["question"],
                        "context": excerpt(row["context"], starts),
                        "gold": refs[i] or ["(no answer)"], "predicted": a["answer"] or "(no answer)",
                        "score": round(float(a["score"]), 6), "f1": round(float(f1[i]), 4)})
        return out

    def postprocess(self, outputs: Iterable, n: int, features: Any = None) -> list[dict[str, Any]]:
        """Answers for `from_texts` inputs: text, character span [start, end) in the context, probability
        among the candidate spans, or no_answer (version 2)."""
        features = features if features is not None else self._encoded
        if features is None or len(features) != n:
            raise RuntimeError("qa postprocess needs the features encode() made for these inputs (encode first)")
        answers, _ = self._answers(outputs, features)
        return [{k: a[k] for k in ("answer", "start", "end", "score", "no_answer")} for a in answers]


def _answer_span(text: str, start: int) -> tuple[int, int]:
    """Characters [start, end) of an answer in its context, without the whitespace around it (an answer " Paris"
    would otherwise label the token before it too)."""
    core = text.strip()
    if not core:
        return start, start + len(text)
    lead = len(text) - len(text.lstrip())
    return start + lead, start + lead + len(core)


def _token_span(offsets: list, in_context: list[bool], span: tuple[int, int] | None, cls: int) -> tuple[int, int]:
    """Token positions of a character span inside one window, or (cls, cls) when the window lacks it."""
    if span is None:
        return cls, cls
    context = [k for k, c in enumerate(in_context) if c]
    first, last = context[0], context[-1]
    start_char, end_char = span
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls, cls
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def _ragged(column: Any) -> list[np.ndarray]:
    """A column of int lists as numpy arrays, without building a Python list per element."""
    array = column.combine_chunks()
    values, offsets = array.flatten().to_numpy(), array.offsets.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(array))]


def _candidate_spans(windows: list[tuple[Any, Any, Any, Any]], n_best: int,
                     max_answer_length: int) -> dict[tuple[int, int], float]:
    """Character spans -> best start+end logit over the windows: the n_best starts and ends among each
    window's context tokens, paired when the end does not precede the start and the span is short enough.
    In the order each span is first met (window by window, start by start), which ranks equal scores."""
    starts, ends, scores = [], [], []
    for start_logits, end_logits, char_starts, char_ends in windows:
        context = np.flatnonzero(char_starts >= 0)
        if not len(context):
            continue
        top_starts = context[np.argsort(-start_logits[context], kind="stable")[:n_best]]
        top_ends = context[np.argsort(-end_logits[context], kind="stable")[:n_best]]
        length = top_ends[None, :] - top_starts[:, None]
        i, j = np.nonzero((length >= 0) & (length < max_answer_length))
        starts.append(char_starts[top_starts[i]])
        ends.append(char_ends[top_ends[j]])
        scores.append(start_logits[top_starts[i]] + end_logits[top_ends[j]])
    if not scores:
        return {}
    start, end, score = np.concatenate(starts), np.concatenate(ends), np.concatenate(scores)
    finite = score > -np.inf  # as a strict "better than nothing yet": no NaN or -inf score is ever kept
    start, end, score = start[finite], end[finite], score[finite]
    if not len(score):
        return {}
    met = np.arange(len(score))
    order = np.lexsort((met, end, start))  # spans grouped, each group in the order met
    start, end, score, met = start[order], end[order], score[order], met[order]
    first = np.flatnonzero(np.r_[True, (start[1:] != start[:-1]) | (end[1:] != end[:-1])])
    best = np.maximum.reduceat(score, first)
    keep = np.argsort(met[first], kind="stable")
    return dict(zip(zip(start[first][keep].tolist(), end[first][keep].tolist()), best[keep].tolist()))
