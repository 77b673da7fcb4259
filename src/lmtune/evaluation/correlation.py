"""Pearson and Spearman correlation in numpy alone (regression metrics, the regression probe of `select`)."""

from __future__ import annotations

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (as scipy.stats.rankdata's default)."""
    _, position, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[position.reshape(-1)]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r; 0.0 where either side is constant (or has fewer than two values)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    return float(np.clip((a @ b) / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the ranks."""
    return pearson(ranks(np.asarray(a).reshape(-1)), ranks(np.asarray(b).reshape(-1)))
