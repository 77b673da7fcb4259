"""SQuAD exact match and F1 with the official answer normalisation, v2 HasAns/NoAns and the no-answer threshold."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (the official order)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_DROP_PUNCTUATION)).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised answers; two empty answers agree (the v2.0 script's rule)."""
    return _f1_tokens(normalize_answer(prediction).split(), normalize_answer(gold).split())


def _f1_tokens(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str]) -> list[str]:
    """The references to score against: answers that normalise to nothing do not count, and a question
    without any (SQuAD v2 unanswerable) has the empty answer as its one reference."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def score(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction: the best over the gold answers, each in [0, 1]."""
    # Each answer normalised once (the official script normalises per pair: same result, several times the work).
    golds = [normalize_answer(a) for a in answers]
    golds = [g for g in golds if g] or [""]
    pred = normalize_answer(prediction)
    pred_tokens = pred.split()
    return float(pred in golds), max(_f1_tokens(pred_tokens, g.split()) for g in golds)


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """exact_match and f1 in percent (as the official scripts print them), with the HasAns/NoAns
    breakdown when some questions have no answer (SQuAD v2: predict "" for no answer)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0, "total": 0}
    scores = np.array([score(p, r) for p, r in zip(predictions, references)], dtype=float).reshape(-1, 2)
    has_answer = np.array([bool(gold_answers(r)[0]) for r in references])
    out: dict[str, float] = {"exact_match": 100 * scores[:, 0].mean(), "f1": 100 * scores[:, 1].mean(),
                             "total": len(predictions)}
    if not has_answer.all():
        for name, mask in (("HasAns", has_answer), ("NoAns", ~has_answer)):
            out[f"{name}_total"] = int(mask.sum())
            if mask.any():
                out[f"{name}_exact"] = 100 * scores[mask, 0].mean()
                out[f"{name}_f1"] = 100 * scores[mask, 1].mean()
    return out


def best_no_answer_threshold(answers: Sequence[str], references: Sequence[Sequence[str]],
                             score_diffs: Sequence[float], metric: str = "f1") -> tuple[float, float]:
    """The threshold on (null score - best span score) that maximises `metric` ("f1" or "exact_match").

    `answers` are the best non-empty spans; a question is answered "no answer" when its score
    difference exceeds the threshold. Returns (best threshold, the metric there in percent), as the
    official v2.0 script's best_f1_thresh does, so the threshold can be set from a validation set.
    """
    index = 1 if metric == "f1" else 0
    if not answers:
        return 0.0, 0.0
    answered = np.array([score(a, r)[index] for a, r in zip(answers, references)])
    abstained = np.array([0.0 if gold_answers(r)[0] else 1.0 for r in references])
    diffs = np.asarray(score_diffs, dtype=float)
    order = np.argsort(diffs, kind="stable")
    # Threshold t answers every question with diff <= t: walk the diffs upwards, switching one
    # question at a time from "no answer" to its span; only the ends of runs of equal diffs count.
    totals = abstained.sum() + np.cumsum(answered[order] - abstained[order])
    ends = np.r_[diffs[order][1:] != diffs[order][:-1], True]
    candidates = [(abstained.sum(), diffs[order][0] - 1.0)] + \
                 [(totals[i], diffs[order][i]) for i in np.flatnonzero(ends)]
    # The lowest threshold that reaches the best score wins, as in the official script.
    best_total, best_threshold = max(candidates, key=lambda c: c[0])
    return float(best_threshold), float(100 * best_total / len(answers))


def excerpt(context: str, starts: list[int], around: int = 300) -> str:
    """The context cut to `around` characters either side of the given offsets (all of it when short)."""
    if len(context) <= 3 * around or not starts:
        return context
    first, last = max(0, min(starts) - around), min(len(context), max(starts) + around)
    return ("…" if first else "") + context[first:last] + ("…" if last < len(context) else "")
