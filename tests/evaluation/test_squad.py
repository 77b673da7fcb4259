"""SQuAD EM/F1 against hand-computed cases: normalisation, max over gold answers, v2 breakdown, threshold."""

from __future__ import annotations

import pytest

from lmtune.evaluation.squad import (best_no_answer_threshold, exact_match, f1, gold_answers, normalize_answer,
                                     score, squad_metrics)


@pytest.mark.parametrize("text, normalised", [
    ("The  Quick, brown FOX!", "quick brown fox"),
    ("an apple a day", "apple day"),
    ("Theater of the Absurd", "theater of absurd"),   # articles only as whole words
    ("  \tU.S.A.  ", "usa"),                           # punctuation removed, not replaced by spaces
    ("rock-'n'-roll", "rocknroll"),
    ("Café THE", "café"),                              # non-ASCII letters are kept, lowercased
    ("", ""),
])
def test_normalize_answer(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match("The Denver Broncos.", "denver broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0


def test_f1_by_hand() -> None:
    # pred {cat, sat} vs gold {cat, sat, down}: precision 1, recall 2/3 -> 2 * (2/3) / (5/3) = 0.8
    assert f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens count once each on the overlap: common 1, precision 1/3, recall 1 -> 0.5
    assert f1("cat cat cat", "cat") == pytest.approx(0.5)
    assert f1("dog", "cat") == 0.0
    assert f1("", "") == 1.0 and f1("", "cat") == 0.0 and f1("the", "") == 1.0   # v2: both empty agree


def test_score_is_the_max_over_gold_answers() -> None:
    golds = ["Denver Broncos", "The Denver Broncos", "Broncos"]
    assert score("denver broncos", golds) == (1.0, 1.0)
    # vs "Denver Broncos": P = R = 1/2 -> 0.5; vs "Broncos": P 1/2, R 1 -> 2/3; the best counts
    em, f = score("Broncos team", ["Denver Broncos", "Broncos"])
    assert em == 0.0 and f == pytest.approx(2 / 3)


@pytest.mark.parametrize("prediction, answers, expected", [
    ("The Broncos!", ["Denver Broncos", "the broncos", "A"], (1.0, 1.0)),
    ("", ["the", "An"], (1.0, 1.0)),          # nothing left of the golds: the empty answer is the reference
    ("", ["Paris", "the"], (0.0, 0.0)),
    ("paris, france", ["Paris", "France", "Paris (France)"], (1.0, 1.0)),
    ("Café", ["CAFÉ", "cafe"], (1.0, 1.0)),
    ("Broncos of Denver", ["Denver", "Broncos team"], (0.0, 0.5)),  # vs "Denver": P 1/3, R 1; vs "Broncos team": 2/5
    ("x", [], (0.0, 0.0)),
])
def test_score_by_hand_and_as_the_pairwise_definition(prediction: str, answers: list[str],
                                                       expected: tuple[float, float]) -> None:
    """score normalises each answer once; the result is the official max over (prediction, gold) pairs."""
    golds = gold_answers(answers)
    assert score(prediction, answers) == pytest.approx(expected)
    assert score(prediction, answers) == (max(exact_match(prediction, g) for g in golds),
                                         pytest.approx(max(f1(prediction, g) for g in golds)))


def test_gold_answers_that_normalise_to_nothing_mean_no_answer() -> None:
    assert gold_answers(["the", "A"]) == [""]
    assert gold_answers([]) == [""]
    assert gold_answers(["the", "Paris"]) == ["Paris"]


def test_squad_metrics_v1_percentages() -> None:
    m = squad_metrics(["Denver Broncos", "the cat sat"], [["Denver Broncos"], ["a cat sat down", "dog"]])
    assert m["exact_match"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(90.0)      # (1 + 0.8) / 2
    assert m["total"] == 2 and "HasAns_total" not in m


def test_squad_metrics_v2_breakdown() -> None:
    refs = [["x y"], [], ["z"], []]
    m = squad_metrics(["x y", "", "", "w"], refs)
    assert m["exact_match"] == pytest.approx(50.0) and m["f1"] == pytest.approx(50.0)
    assert (m["HasAns_total"], m["NoAns_total"]) == (2, 2)
    assert m["HasAns_exact"] == pytest.approx(50.0) and m["HasAns_f1"] == pytest.approx(50.0)
    assert m["NoAns_exact"] == pytest.approx(50.0) and m["NoAns_f1"] == pytest.approx(50.0)


def test_squad_metrics_checks_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1"):
        squad_metrics(["a", "b"], [["a"]])


def test_best_no_answer_threshold_by_hand() -> None:
    # Best spans score F1 1, 0, 0 against their references; "no answer" scores 0, 1, 0.
    spans, refs, diffs = ["a b", "c", "d"], [["a b"], [], ["z"]], [-1.0, 2.0, 0.5]
    # Thresholds: below -1 -> all abstain: 1 of 3; -1 -> 2; 0.5 -> 2; 2 -> 1. The lowest best one wins.
    threshold, value = best_no_answer_threshold(spans, refs, diffs, "f1")
    assert threshold == -1.0 and value == pytest.approx(200 / 3)
    # Abstaining everywhere is best when every span is wrong.
    threshold, value = best_no_answer_threshold(["q", "r"], [[], ["s"]], [0.0, 1.0], "exact_match")
    assert threshold < 0.0 and value == pytest.approx(50.0)
