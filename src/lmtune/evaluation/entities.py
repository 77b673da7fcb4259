"""Entity-level scores of tag sequences (seqeval's definitions), each side's entities read once."""

from __future__ import annotations

from typing import Iterable


def entity_scores(y_true: list[list[str]], y_pred: list[list[str]], types: Iterable[str],
                  strict: bool) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """seqeval's micro average and per-type rows (precision, recall, f1, support; 0 where undefined), from the
    entities of each side read once: seqeval's classification_report reads them again for every average it
    prints (ten passes over the tags, seconds on a CoNLL validation set)."""
    if [len(s) for s in y_true] != [len(s) for s in y_pred]:
        raise ValueError("entity_scores: true and predicted tags differ in length for some sentence")
    true, predicted = _entity_sets(y_true, strict), _entity_sets(y_pred, strict)

    def counts(kind: str) -> tuple[int, int, int]:  # correct, predicted, true entities of one type
        t, p = true.get(kind, set()), predicted.get(kind, set())
        return len(t & p), len(p), len(t)

    per_type = {kind: _prf(*counts(kind)) for kind in types}
    micro = _prf(*[sum(c) for c in zip(*(counts(k) for k in {*true, *predicted, *types}))] or [0, 0, 0])
    return micro, per_type


def _entity_sets(sentences: list[list[str]], strict: bool) -> dict[str, set]:
    """Entities of all sentences by type, as seqeval's scores identify them."""
    by_type: dict[str, set] = {}
    if strict:
        from seqeval.scheme import IOB2, Entities

        for entity in (e for row in Entities(sentences, IOB2).entities for e in row):
            by_type.setdefault(entity.tag, set()).add(entity.to_tuple())
    else:
        from seqeval.metrics.sequence_labeling import get_entities

        for kind, start, end in get_entities(sentences):
            by_type.setdefault(kind, set()).add((start, end))
    return by_type


def _prf(correct: int, predicted: int, true: int) -> dict[str, float]:
    """Precision, recall, F1 and support from entity counts; 0 where a ratio is undefined (zero_division=0)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(true)}
