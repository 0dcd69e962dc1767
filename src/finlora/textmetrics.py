"""Metrics for generated text: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), label answers.

BLEU is sacrebleu's corpus score on its 0-100 scale; ROUGE is the mean F-measure over answers
on a 0-1 scale (with the Porter stemmer), as both libraries report them by default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measure of every answer against its reference, one scorer for all."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError("need one reference per prediction")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    return {key: [float(s[key].fmeasure) for s in scores] for key in ROUGE_KEYS}


def generation_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    rouge: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Corpus BLEU and mean ROUGE-1/2/L F-measures of predictions against one reference each;
    `rouge` passes per-answer scores already computed by `rouge_f1`."""
    import sacrebleu

    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one reference per prediction, and at least one")
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    rouge = rouge if rouge is not None else rouge_f1(predictions, references)
    return {"bleu": float(bleu), **{k: sum(v) / len(v) for k, v in rouge.items()}}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one answer."""
    return rouge_f1([prediction], [reference])["rougeL"][0]


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
