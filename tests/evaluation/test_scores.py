"""The numpy classification scores give scikit-learn's figures (zero_division=0), single- and multi-label."""

import numpy as np
import pytest

from lmtune.evaluation.scores import confusion, label_counts, macro_f1, micro_f1, prf


def _cases(multi_label: bool):
    for trial in range(40):
        rng = np.random.default_rng(trial)
        k, n = int(rng.integers(2, 7)), int(rng.integers(1, 60))
        if multi_label:
            yield k, rng.integers(0, 2, size=(n, k)), rng.integers(0, 2, size=(n, k))
        else:  # some classes never appear (in gold, predictions or both)
            used = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)
            yield k, rng.choice(used, size=n), rng.choice(rng.choice(k, size=2), size=n)


def test_single_label_scores_match_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    for k, gold, pred in _cases(multi_label=False):
        assert macro_f1(gold, pred, k) == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0),
                                                        abs=1e-12)
        assert confusion(gold, pred, k).tolist() == confusion_matrix(gold, pred, labels=range(k)).tolist()
        ours = (*prf(*label_counts(gold, pred, k)), label_counts(gold, pred, k)[2])
        theirs = precision_recall_fscore_support(gold, pred, labels=range(k), zero_division=0)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_multi_label_scores_match_sklearn():
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    for k, gold, pred in _cases(multi_label=True):
        seen = np.flatnonzero(gold.any(0) | pred.any(0))
        expected = f1_score(gold, pred, average="macro", labels=seen, zero_division=0) if len(seen) else 0.0
        assert macro_f1(gold, pred, k) == pytest.approx(expected, abs=1e-12)
        assert micro_f1(gold, pred, k) == pytest.approx(f1_score(gold, pred, average="micro", zero_division=0),
                                                        abs=1e-12)
        ours = (*prf(*label_counts(gold, pred, k)), label_counts(gold, pred, k)[2])
        for a, b in zip(ours, precision_recall_fscore_support(gold, pred, zero_division=0)):
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_a_label_in_neither_gold_nor_predictions_is_no_zero_in_the_mean():
    gold, pred = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])
    assert macro_f1(gold, pred, 5) == 1.0
    assert macro_f1(gold, np.array([0, 0, 0, 0]), 2) == pytest.approx((2 * 2 / 6 + 0.0) / 2)
