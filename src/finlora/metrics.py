"""Classification metrics, calibration and their text report.

Everything returned by `classification_metrics` is plain Python (int, float, str, list, dict) so a
recipe can write it straight to JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from finlora.errors import FinloraError

# exp(709.78) is the largest finite float64; stop a little short and call the rest infinite.
_MAX_EXP_LOSS = 700.0


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin summary of equal-width confidence bins on [0, 1].

    Bin `b` covers `(edges[b], edges[b + 1]]`; the first bin also holds confidence 0.
    `accuracy` and `confidence` are NaN for empty bins.
    """

    edges: np.ndarray  # (n_bins + 1,)
    count: np.ndarray  # (n_bins,) int
    accuracy: np.ndarray  # (n_bins,) mean of `correct` in the bin
    confidence: np.ndarray  # (n_bins,) mean confidence in the bin


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15
) -> CalibrationBins:
    """Group predictions into `n_bins` equal-width confidence bins.

    Raises FinloraError when there are no predictions, ValueError on mismatched shapes,
    confidences outside [0, 1] or `n_bins < 1`.
    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != hit.shape:
        raise ValueError(f"confidence has {conf.size} values but correct has {hit.size}")
    if conf.size == 0:
        raise FinloraError("no examples to evaluate")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if np.any(~np.isfinite(conf)) or conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError("confidence values must be finite and within [0, 1]")

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a confidence equal to an upper edge into that bin: bins are (lo, hi].
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(idx, weights=hit, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return CalibrationBins(edges=edges, count=count, accuracy=accuracy, confidence=mean_conf)


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15
) -> float:
    """Expected calibration error: sum over bins of |acc_b - conf_b| * n_b / n.

    `confidence` is the probability given to the predicted class, `correct` whether that
    prediction was right (bool or 0/1). Raises as `calibration_bins`.
    """
    bins = calibration_bins(confidence, correct, n_bins)
    filled = bins.count > 0
    gap = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(gap * bins.count[filled]) / np.sum(bins.count))


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    probs: np.ndarray,
    labels: Sequence[str],
) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, ECE, per-class scores and the confusion matrix.

    `probs` is (n, len(labels)), each row a distribution over `labels` in that order; the ECE
    uses the probability of each example's predicted label. Confusion-matrix rows are true
    labels and columns predicted labels, both in `labels` order.

    Raises FinloraError when there are no examples or a label is not in `labels`, and
    ValueError when the lengths or the shape of `probs` disagree.
    """
    labels = list(labels)
    y_true, y_pred = list(y_true), list(y_pred)
    p = np.asarray(probs, dtype=np.float64)  # (n, C)
    _check_inputs(y_true, y_pred, p, labels)

    column = {label: i for i, label in enumerate(labels)}
    pred_idx = np.array([column[y] for y in y_pred])
    confidence = p[np.arange(len(y_pred)), pred_idx]  # (n,)
    correct = np.array(y_true) == np.array(y_pred)

    # zero_division=0: a class that is never predicted (or never present) scores 0, quietly.
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    # Macro-F1 averages the labels that occur (in the data or the predictions), as scikit-learn
    # does by default: a label the evaluated data never holds and the model never predicts
    # would add a 0 that no classifier could avoid.
    seen = set(y_true) | set(y_pred)
    present = [label for label in labels if label in seen]
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
        "absent_labels": [label for label in labels if label not in seen],
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        "ece": expected_calibration_error(confidence, correct),
        "labels": labels,
        "per_class": per_class,
        "confusion_matrix": [[int(c) for c in row] for row in cm],
    }


def _check_inputs(y_true: list[str], y_pred: list[str], p: np.ndarray, labels: list[str]) -> None:
    if not (len(y_true) == len(y_pred) == (p.shape[0] if p.ndim else 0)):
        raise ValueError(
            f"lengths disagree: y_true {len(y_true)}, y_pred {len(y_pred)}, "
            f"probs {p.shape[0] if p.ndim else 'scalar'}"
        )
    if len(y_true) == 0:
        raise FinloraError("no examples to evaluate")
    if p.ndim != 2 or p.shape[1] != len(labels):
        raise ValueError(f"probs must have shape (n, {len(labels)}), got {p.shape}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels contain duplicates: {labels}")
    unknown = sorted((set(y_true) | set(y_pred)) - set(labels))
    if unknown:
        raise FinloraError(f"labels {unknown} are not among the known labels {labels}")


# Below this many rows, a 95 % interval of the accuracy is wider than about +-0.1 near 0.5.
SMALL_TEST = 100
_Z95 = 1.959964  # the standard normal quantile of 0.975


def wilson_interval(correct: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion `correct / n` (95 % with the default `z`).

    Unlike p +- z * sqrt(p(1-p)/n) it stays within [0, 1] and keeps a width at 0 or n correct,
    which is what small test sets need. (0.0, 1.0) for n = 0.
    """
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    scale = 1 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def format_classification_report(m: dict[str, Any], title: str | None = None) -> str:
    """Render the output of `classification_metrics` as an aligned plain-text report: the
    accuracy with its 95 % (Wilson) interval, and a note when fewer than 100 rows were
    scored."""
    lines = []
    if title:
        lines += [title, "=" * len(title)]
    low, high = wilson_interval(round(m["accuracy"] * m["n"]), m["n"])
    lines.append(
        f"accuracy {m['accuracy']:.4f} (95% CI {low:.3f}-{high:.3f})   "
        f"macro-F1 {m['macro_f1']:.4f}   weighted-F1 {m['weighted_f1']:.4f}   "
        f"ECE {m['ece']:.4f}   n {m['n']}"
    )
    if m["n"] < SMALL_TEST:
        lines.append(
            f"(only {m['n']} rows: the accuracy is known to within the interval beside it; "
            "runs that differ by less cannot be told apart here)"
        )
    if m.get("temperature", 1.0) != 1.0:
        lines.append(
            f"calibrated: the scores divided by temperature {m['temperature']:.3f} (fitted on "
            f"the validation split); ECE before {m['ece_uncalibrated']:.4f}"
        )
    if m.get("absent_labels"):
        lines.append(
            f"(macro-F1 averages the labels present; absent here: {', '.join(m['absent_labels'])})"
        )
    if m.get("sources"):
        lines += ["", *_sources_table(m)]
    lines += ["", *_per_class_table(m), "", *_confusion_table(m)]
    return "\n".join(lines) + "\n"


def _sources_table(m: dict[str, Any]) -> list[str]:
    """A run on several sources: each source's figures on its own test rows, then the pool's."""
    rows = [*m["sources"].items(), ("pooled", m)]
    width = max(len("source"), *(len(name) for name, _ in rows))
    head = f"{'source':<{width}}  {'accuracy':>9}  {'macro-F1':>9}  {'weighted-F1':>11}  "
    lines = [head + f"{'ECE':>7}  {'n':>6}"]
    for name, s in rows:
        lines.append(
            f"{name:<{width}}  {s['accuracy']:>9.4f}  {s['macro_f1']:>9.4f}  "
            f"{s['weighted_f1']:>11.4f}  {s['ece']:>7.4f}  {s['n']:>6d}"
        )
    return lines


def _per_class_table(m: dict[str, Any]) -> list[str]:
    width = max(len("class"), *(len(label) for label in m["labels"]))
    rows = [f"{'class':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"]
    for label in m["labels"]:
        c = m["per_class"][label]
        rows.append(
            f"{label:<{width}}  {c['precision']:>9.4f}  {c['recall']:>9.4f}  "
            f"{c['f1']:>9.4f}  {c['support']:>9d}"
        )
    return rows


def _confusion_table(m: dict[str, Any]) -> list[str]:
    labels, cm = m["labels"], m["confusion_matrix"]
    corner = "true \\ pred"
    head = max(len(corner), *(len(label) for label in labels))
    cell = max(5, *(len(label) for label in labels), *(len(str(c)) for row in cm for c in row))
    rows = [f"{corner:<{head}}  " + "  ".join(f"{label:>{cell}}" for label in labels)]
    for label, row in zip(labels, cm, strict=True):
        rows.append(f"{label:<{head}}  " + "  ".join(f"{c:>{cell}d}" for c in row))
    return rows


def cross_entropy_perplexity(mean_loss: float) -> float:
    """Perplexity exp(mean_loss); infinite when the loss is too large to exponentiate."""
    if mean_loss > _MAX_EXP_LOSS:
        return float("inf")
    return math.exp(mean_loss)
