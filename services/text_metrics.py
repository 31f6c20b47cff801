"""Generation quality metrics, all on a 0-100 scale: exact match, BLEU, ROUGE-1/2/L.

BLEU is sacrebleu's sentence BLEU (13a tokenization, exponential smoothing, effective
n-gram order), ROUGE is rouge-score's F-measure without stemming: both are the
reference implementations, so numbers compare with published ones.
"""
from __future__ import annotations

import re

import sacrebleu
from rouge_score import rouge_scorer

METRICS = ("em", "bleu", "rouge")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def normalize(text: str) -> str:
    """Whitespace collapsed and one trailing period dropped; case is kept (it can be the task)."""
    text = re.sub(r"\s+", " ", text).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if normalize(prediction) == normalize(reference) else 0.0


def bleu(prediction: str, reference: str) -> float:
    return sacrebleu.sentence_bleu(prediction, [reference]).score


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """F-measures keyed rouge1, rouge2, rougeL."""
    scores = _rouge.score(reference, prediction)
    return {name: 100.0 * scores[name].fmeasure for name in ROUGE_TYPES}


def score(metric: str, prediction: str, reference: str) -> dict[str, float]:
    """The scores a query's metric asks for: {"em": ...}, {"bleu": ...} or the three ROUGE scores."""
    if metric == "em":
        return {"em": exact_match(prediction, reference)}
    if metric == "bleu":
        return {"bleu": bleu(prediction, reference)}
    if metric == "rouge":
        return rouge(prediction, reference)
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
