"""Plots write a real PNG atomically and close their figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from finlora.errors import FinloraError
from finlora.plots import plot_confusion_matrix, plot_loss_curve, plot_reliability_diagram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STEP_ROWS = [
    {"kind": "step", "step": s, "epoch": s / 40, "loss": 1.5 / (1 + s / 20), "lr": 1e-4}
    for s in range(1, 81)
]
EPOCH_ROWS = [
    {"kind": "epoch", "epoch": 1, "step": 40, "train_loss": 0.9, "val_loss": 0.8,
     "val_accuracy": 0.71},
    {"kind": "epoch", "epoch": 2, "step": 80, "train_loss": 0.6, "val_loss": 0.62,
     "val_accuracy": 0.78},
]  # fmt: skip


def _assert_only_png(path: Path) -> None:
    """`path` is a non-empty PNG, alone in its directory, and no figure is left open."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 1000
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert plt.get_fignums() == []


def test_confusion_matrix_png(tmp_path: Path) -> None:
    out = tmp_path / "cm.png"
    result = plot_confusion_matrix([[5, 1, 0], [2, 9, 1], [0, 0, 0]], ["neg", "neu", "pos"], out)
    assert result == out
    _assert_only_png(out)


def test_confusion_matrix_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3x3"):
        plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "cm.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "rows",
    [STEP_ROWS + EPOCH_ROWS, STEP_ROWS, EPOCH_ROWS, STEP_ROWS[:3]],
    ids=["both", "steps-only", "epochs-only", "few-steps"],
)
def test_loss_curve_png(tmp_path: Path, rows: list[dict]) -> None:
    out = tmp_path / "loss.png"
    assert plot_loss_curve(rows, out) == out
    _assert_only_png(out)


def test_loss_curve_tolerates_missing_and_null_values(tmp_path: Path) -> None:
    rows = [
        {"kind": "epoch", "epoch": 1, "step": 10, "train_loss": 0.5, "val_loss": None},
        {"kind": "step", "step": 5, "loss": float("nan")},
        {"kind": "eval", "step": 10, "note": "ignored"},
    ]
    out = tmp_path / "loss.png"
    plot_loss_curve(rows, out)
    _assert_only_png(out)


def test_loss_curve_accuracy_only(tmp_path: Path) -> None:
    rows = [{"kind": "epoch", "epoch": 1, "step": 10, "val_accuracy": 0.8}]
    out = tmp_path / "loss.png"
    plot_loss_curve(rows, out)
    _assert_only_png(out)


@pytest.mark.parametrize(
    "rows",
    [[], [{"kind": "step", "step": 1, "lr": 1e-4}], [{"kind": "epoch", "epoch": 1}]],
    ids=["empty", "no-loss", "no-step"],
)
def test_loss_curve_nothing_to_plot(tmp_path: Path, rows: list[dict]) -> None:
    with pytest.raises(FinloraError, match="nothing to plot"):
        plot_loss_curve(rows, tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []
    assert plt.get_fignums() == []


def test_reliability_diagram_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.34, 1.0, size=200)
    correct = rng.uniform(size=200) < conf
    out = tmp_path / "reliability.png"
    assert plot_reliability_diagram(conf, correct, out, n_bins=10) == out
    _assert_only_png(out)


def test_reliability_diagram_empty_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(FinloraError):
        plot_reliability_diagram(np.array([]), np.array([]), tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == []
