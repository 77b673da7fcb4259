"""Classification scores from counts, in numpy: per-class precision, recall and F1 (0 where a count is 0, as
scikit-learn's `zero_division=0`), and the confusion matrix, without importing scikit-learn into every run."""

from __future__ import annotations

import numpy as np


def label_counts(gold: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label: true positives, times predicted, times in gold. Labels are indices 0..k-1 (one per row), or 0/1
    columns of a multi-label indicator matrix."""
    if gold.ndim == 2:
        gold, pred = gold.astype(bool), pred.astype(bool)
        return (gold & pred).sum(0), pred.sum(0), gold.sum(0)
    matrix = confusion(gold, pred, k)
    return np.diag(matrix), matrix.sum(0), matrix.sum(1)


def confusion(gold: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Rows: gold label; columns: predicted label."""
    return np.bincount(np.asarray(gold, dtype=np.int64) * k + np.asarray(pred, dtype=np.int64),
                       minlength=k * k).reshape(k, k)


def prf(tp: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per label (F1 = 2 tp / (predicted + actual))."""
    return _divide(tp, predicted), _divide(tp, actual), _divide(2 * tp, predicted + actual)


def macro_f1(gold: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Mean F1 over the labels in gold or predictions (a label in neither is no 0 in the mean)."""
    tp, predicted, actual = label_counts(gold, pred, k)
    present = (predicted + actual) > 0
    return float(prf(tp, predicted, actual)[2][present].mean()) if present.any() else 0.0


def micro_f1(gold: np.ndarray, pred: np.ndarray, k: int) -> float:
    tp, predicted, actual = label_counts(gold, pred, k)
    return float(_divide(2 * tp.sum(keepdims=True), (predicted + actual).sum(keepdims=True))[0])


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)
