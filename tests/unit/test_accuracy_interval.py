"""The accuracy's 95 % Wilson interval in the text report, and the note on a small test set."""

from __future__ import annotations

import numpy as np
import pytest

from finlora.metrics import classification_metrics, format_classification_report, wilson_interval

LABELS = ["negative", "neutral", "positive"]


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        # as scipy.stats.binomtest(k, n).proportion_ci(method="wilson") gives them
        (7, 10, 0.396778, 0.892209),
        (81, 100, 0.722212, 0.874852),
        (0, 10, 0.0, 0.277533),  # no width lost at 0 correct, unlike p +- z * se
        (10, 10, 0.722467, 1.0),
    ],
)
def test_wilson_interval(correct: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(correct, n) == pytest.approx((low, high), abs=1e-6)


def test_no_rows_know_nothing() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _report(n: int, correct: int) -> list[str]:
    y_true = ["neutral"] * n
    y_pred = ["neutral"] * correct + ["positive"] * (n - correct)
    probs = np.array([[0.1, 0.8, 0.1] if y == "neutral" else [0.1, 0.1, 0.8] for y in y_pred])
    m = classification_metrics(y_true, y_pred, probs, LABELS)
    return format_classification_report(m).splitlines()


def test_report_gives_the_interval_beside_the_accuracy() -> None:
    lines = _report(10, 7)
    assert lines[0].startswith("accuracy 0.7000 (95% CI 0.397-0.892)   macro-F1 ")
    assert lines[1] == (
        "(only 10 rows: the accuracy is known to within the interval beside it; runs that "
        "differ by less cannot be told apart here)"
    )


def test_no_small_set_note_from_100_rows() -> None:
    lines = _report(100, 81)
    assert lines[0].startswith("accuracy 0.8100 (95% CI 0.722-0.875)")
    assert not any(line.startswith("(only ") for line in lines)
