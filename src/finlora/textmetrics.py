"""Metrics for generated text: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), label answers.

BLEU is sacrebleu's corpus score on its 0-100 scale; ROUGE is the mean F-measure over answers
on a 0-1 scale (with the Porter stemmer), as both libraries report them by default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and mean ROUGE-1/2/L F-measures of predictions against one reference each."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one reference per prediction, and at least one")
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    return {"bleu": float(bleu), **{k: v / len(predictions) for k, v in totals.items()}}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one answer, for per-answer reports."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(reference, prediction)["rougeL"].fmeasure)


def labels_named(text: str, labels: Sequence[str]) -> list[str]:
    """The labels that `text` names as whole words (case-insensitive), in `labels` order."""
    return [label for label in labels if re.search(rf"\b{re.escape(label)}\b", text, re.IGNORECASE)]


def label_answer_metrics(
    predictions: Sequence[str], gold: Sequence[str], valid: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """For answers that should be a label: the share naming exactly one valid label, and the
    share whose one label is the gold one. `valid[i]` is the label set for answer i."""
    if not predictions:
        return {"label_n": 0}
    one, right = 0, 0
    for prediction, label, labels in zip(predictions, gold, valid, strict=True):
        named = labels_named(prediction, labels)
        if len(named) == 1:
            one += 1
            right += named[0].lower() == label.lower()
    n = len(predictions)
    return {"label_n": n, "single_valid_label": one / n, "label_accuracy": right / n}
