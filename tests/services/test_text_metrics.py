"""Metrics against values worked out by hand from the definitions."""
import math

import pytest

from services import text_metrics as tm

REF = "the cat sat on the mat"
HYP = "the cat sat on a mat"


def test_exact_match_normalizes_whitespace_and_final_period_but_not_case():
    assert tm.exact_match("  54. ", "54") == 100.0
    assert tm.exact_match("ka  miru\n", "ka miru") == 100.0
    assert tm.exact_match("svt", "SVT") == 0.0
    assert tm.exact_match("The answer is 54", "54") == 0.0


def test_bleu_by_hand():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert tm.bleu(HYP, REF) == pytest.approx(expected, abs=1e-6)
    assert tm.bleu(REF, REF) == pytest.approx(100.0)


def test_bleu_brevity_penalty_by_hand():
    # "the cat sat on": every n-gram matches (precisions 1), brevity penalty exp(1 - 6/4).
    assert tm.bleu("the cat sat on", REF) == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-6)


def test_rouge_by_hand():
    scores = tm.rouge(HYP, REF)
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)  # 5 shared unigrams of 6 each side
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)  # the cat, cat sat, sat on
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)  # LCS "the cat sat on mat"
    assert tm.rouge("dog", REF) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_unequal_lengths_by_hand():
    # P = 2/2, R = 2/6: F = 2PR/(P+R) = 1/2.
    assert tm.rouge("cat mat", REF)["rouge1"] == pytest.approx(50.0)


def test_score_dispatches_on_metric_and_rejects_unknown():
    assert tm.score("em", "x", "x") == {"em": 100.0}
    assert set(tm.score("rouge", HYP, REF)) == {"rouge1", "rouge2", "rougeL"}
    assert tm.score("bleu", REF, REF)["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        tm.score("f1", "a", "b")
