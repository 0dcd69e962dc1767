"""Metrics against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from finlora.errors import FinloraError
from finlora.metrics import (
    calibration_bins,
    classification_metrics,
    cross_entropy_perplexity,
    expected_calibration_error,
    format_classification_report,
)

LABELS = ["negative", "neutral", "positive"]


def _imbalanced() -> tuple[list[str], list[str]]:
    """10 examples: 6 neutral, 3 positive, 1 negative; negative is never predicted.

    Confusion matrix (rows true, columns predicted, order negative/neutral/positive):
        negative  [0, 1, 0]
        neutral   [0, 5, 1]
        positive  [0, 1, 2]
    """
    y_true = ["neutral"] * 6 + ["positive"] * 3 + ["negative"]
    y_pred = ["neutral"] * 5 + ["positive"] + ["positive"] * 2 + ["neutral"] + ["neutral"]
    return y_true, y_pred


def _probs(y_pred: list[str], top: float = 0.8) -> np.ndarray:
    """Every row gives `top` to its predicted label and splits the rest evenly."""
    rest = (1 - top) / (len(LABELS) - 1)
    p = np.full((len(y_pred), len(LABELS)), rest)
    for i, label in enumerate(y_pred):
        p[i, LABELS.index(label)] = top
    return p


def test_ece_known_four_examples() -> None:
    # 5 bins of width 0.2. Bin (0.8, 1]: 0.95 right, 0.85 wrong -> |0.5 - 0.9| * 2.
    # Bin (0.4, 0.6]: 0.55 right -> |1 - 0.55|. Bin (0.2, 0.4]: 0.25 wrong -> |0 - 0.25|.
    # ECE = (0.8 + 0.45 + 0.25) / 4 = 0.375.
    conf = np.array([0.95, 0.85, 0.55, 0.25])
    correct = np.array([True, False, True, False])
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(0.375)


def test_ece_one_bin_is_gap_between_means() -> None:
    conf = np.array([0.9, 0.7, 0.5, 0.3])
    correct = np.array([1, 1, 0, 0])
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(0.1)


def test_ece_perfectly_calibrated_is_zero() -> None:
    conf = np.array([0.75] * 4)
    correct = np.array([1, 1, 1, 0])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)


def test_calibration_bins_edges_are_upper_inclusive() -> None:
    bins = calibration_bins(np.array([0.0, 0.1, 0.5, 1.0]), np.array([1, 0, 1, 1]), n_bins=2)
    assert bins.count.tolist() == [3, 1]  # 0.0 joins the first bin, 0.5 closes it
    assert bins.accuracy.tolist() == pytest.approx([2 / 3, 1.0])
    assert bins.confidence.tolist() == pytest.approx([0.2, 1.0])


def test_calibration_bins_empty_bins_are_nan() -> None:
    bins = calibration_bins(np.array([0.95]), np.array([1]), n_bins=4)
    assert bins.count.tolist() == [0, 0, 0, 1]
    assert np.isnan(bins.accuracy[:3]).all()


@pytest.mark.parametrize(
    ("conf", "correct", "n_bins", "error"),
    [
        ([], [], 15, FinloraError),
        ([0.5, 0.6], [1], 15, ValueError),
        ([1.5], [1], 15, ValueError),
        ([0.5], [1], 0, ValueError),
    ],
)
def test_ece_rejects_bad_input(conf, correct, n_bins, error) -> None:
    with pytest.raises(error):
        expected_calibration_error(np.array(conf), np.array(correct), n_bins=n_bins)


def test_classification_metrics_imbalanced_by_hand() -> None:
    y_true, y_pred = _imbalanced()
    m = classification_metrics(y_true, y_pred, _probs(y_pred), LABELS)

    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.7)
    # Per-class F1: negative 0, neutral 2*5/(7+6) = 10/13, positive 2/3.
    assert m["macro_f1"] == pytest.approx((0 + 10 / 13 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((1 * 0 + 6 * 10 / 13 + 3 * 2 / 3) / 10)
    # Every confidence is 0.8 and 7 of 10 are right: one bin, gap 0.1.
    assert m["ece"] == pytest.approx(0.1)
    assert m["labels"] == LABELS
    assert m["confusion_matrix"] == [[0, 1, 0], [0, 5, 1], [0, 1, 2]]
    assert m["per_class"]["neutral"] == pytest.approx(
        {"precision": 5 / 7, "recall": 5 / 6, "f1": 10 / 13, "support": 6}
    )
    assert m["per_class"]["positive"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )


@pytest.mark.filterwarnings("error")
def test_class_never_predicted_scores_zero_without_warning() -> None:
    y_true, y_pred = _imbalanced()
    m = classification_metrics(y_true, y_pred, _probs(y_pred), LABELS)
    assert m["per_class"]["negative"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_macro_f1_averages_the_labels_that_occur() -> None:
    # Two labels in the data and the predictions, a third the run knows: perfect is 1.0.
    y_true = y_pred = ["negative", "positive", "positive"]
    m = classification_metrics(y_true, y_pred, _probs(y_pred), LABELS)
    assert m["macro_f1"] == 1.0 and m["absent_labels"] == ["neutral"]
    assert "absent here: neutral" in format_classification_report(m)
    # A label predicted but never true still counts (its F1 is 0).
    wrong = classification_metrics(
        ["negative"] * 2, ["negative", "neutral"], _probs(["negative", "neutral"]), LABELS
    )
    assert wrong["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_confusion_matrix_rows_are_true_columns_predicted() -> None:
    y_true, y_pred = ["negative", "negative"], ["positive", "positive"]
    m = classification_metrics(y_true, y_pred, _probs(y_pred), LABELS)
    assert m["confusion_matrix"] == [[0, 0, 2], [0, 0, 0], [0, 0, 0]]


def test_metrics_are_plain_json_types() -> None:
    y_true, y_pred = _imbalanced()
    m = classification_metrics(y_true, y_pred, _probs(y_pred), LABELS)
    assert json.loads(json.dumps(m)) == m
    assert type(m["n"]) is int and type(m["accuracy"]) is float
    assert type(m["confusion_matrix"][0][0]) is int
    assert type(m["per_class"]["neutral"]["support"]) is int


def test_ece_uses_probability_of_predicted_label() -> None:
    # Both predictions right with confidence 0.6 -> ECE 0.4 whatever the other columns say.
    p = np.array([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])
    m = classification_metrics(["negative", "positive"], ["negative", "positive"], p, LABELS)
    assert m["ece"] == pytest.approx(0.4)


def test_no_examples_is_a_user_error() -> None:
    with pytest.raises(FinloraError, match="no examples to evaluate"):
        classification_metrics([], [], np.zeros((0, 3)), LABELS)


def test_unknown_label_is_named() -> None:
    with pytest.raises(FinloraError, match="bullish"):
        classification_metrics(["bullish"], ["neutral"], _probs(["neutral"]), LABELS)


def test_mismatched_shapes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="lengths"):
        classification_metrics(["neutral"], ["neutral", "neutral"], _probs(["neutral"]), LABELS)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(["neutral"], ["neutral"], np.ones((1, 2)) / 2, LABELS)


def test_report_has_headline_table_and_aligned_matrix() -> None:
    y_true, y_pred = _imbalanced()
    m = classification_metrics(y_true, y_pred, _probs(y_pred), LABELS)
    text = format_classification_report(m, title="FPB test")

    lines = text.splitlines()
    assert lines[:2] == ["FPB test", "========"]
    assert "accuracy 0.7000" in lines[2] and "n 10" in lines[2] and "ECE 0.1000" in lines[2]
    assert "macro-F1 0.4786" in lines[2]  # 56/117
    assert "weighted-F1 0.6615" in lines[2]  # 43/65
    neutral = next(line for line in lines if line.startswith("neutral ") and "." in line)
    assert neutral.split() == ["neutral", "0.7143", "0.8333", "0.7692", "6"]

    start = next(i for i, line in enumerate(lines) if line.startswith("true \\ pred"))
    table = lines[start : start + 4]
    assert table[0].split()[-3:] == LABELS
    assert table[2].split() == ["neutral", "0", "5", "1"]
    assert len({len(line) for line in table}) == 1  # columns line up


def test_report_without_title_starts_with_headline() -> None:
    y_true, y_pred = _imbalanced()
    m = classification_metrics(y_true, y_pred, _probs(y_pred), LABELS)
    assert format_classification_report(m).startswith("accuracy ")


def test_perplexity() -> None:
    assert cross_entropy_perplexity(0.0) == 1.0
    assert cross_entropy_perplexity(math.log(2.0)) == pytest.approx(2.0)
    assert math.isfinite(cross_entropy_perplexity(700.0))
    assert cross_entropy_perplexity(701.0) == float("inf")
    assert cross_entropy_perplexity(1e9) == float("inf")
