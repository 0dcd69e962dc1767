"""PNG plots for a run: confusion matrix, loss curve, reliability diagram, score histogram.

Every function writes its file atomically and closes its figure, so it is safe to call from a
long training loop without leaking memory or leaving half-written images behind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

# Headless by design: runs happen on servers and in CI where no display exists.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from finlora.atomic import atomic_path  # noqa: E402
from finlora.errors import FinloraError  # noqa: E402
from finlora.metrics import calibration_bins, expected_calibration_error  # noqa: E402

_DPI = 120
_STEP_COLOR = "tab:blue"
_VAL_COLOR = "tab:orange"


def _save(fig: Figure, path: Path) -> Path:
    """Write `fig` as PNG through a temporary file and always close it."""
    target = Path(path)
    try:
        with atomic_path(target) as tmp:
            # The temp name ends in .tmp, so the format must be given explicitly.
            fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return target


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]],
    labels: Sequence[str],
    path: Path,
    title: str = "Confusion matrix",
) -> Path:
    """Heatmap of a confusion matrix (rows true, columns predicted) with counts and row %.

    Colour is the row-normalised share, so a rare class is as visible as a common one.
    Raises ValueError when `cm` is not square with one row per label.
    """
    counts = np.asarray(cm, dtype=np.int64)  # (C, C)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix must be {n}x{n} for {n} labels, got {counts.shape}")
    row_sum = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, row_sum, out=np.zeros(counts.shape), where=row_sum > 0) * 100

    side = 2.2 + 1.1 * n
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("% of true class")
    for i in range(n):
        for j in range(n):
            ink = "white" if share[i, j] > 55 else "black"
            # A class absent from the data has no meaningful share; show only its zero count.
            text = f"{counts[i, j]}\n{share[i, j]:.1f}%" if row_sum[i, 0] else f"{counts[i, j]}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                color=ink,
                fontsize=10,
            )
    ax.set_xticks(
        range(n),
        labels=list(labels),
        rotation=30 if n > 4 else 0,
        ha="right" if n > 4 else "center",
    )
    ax.set_yticks(range(n), labels=list(labels))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    return _save(fig, path)


def _number(row: dict[str, Any], key: str) -> float | None:
    """`row[key]` as a finite float, or None when missing, null or not finite."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _points(rows: Sequence[dict[str, Any]], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over records of `kind` that have both a step and that key."""
    xs, ys = [], []
    for row in rows:
        step, value = _number(row, "step"), _number(row, key)
        if row.get("kind") == kind and step is not None and value is not None:
            xs.append(step)
            ys.append(value)
    return xs, ys


def _ema(values: Sequence[float], weight: float) -> np.ndarray:
    """Exponential moving average with the start-up bias removed (as TensorBoard does)."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def plot_loss_curve(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Training loss per step (raw and smoothed), epoch train/val loss, and val accuracy.

    `rows` are metrics.jsonl records: `{"kind": "step", "step", "loss", ...}` and
    `{"kind": "epoch", "step", "train_loss", "val_loss", "val_accuracy", ...}`; either kind may
    be absent. Validation accuracy, when present, gets its own panel below the losses.
    Raises FinloraError when no record has anything to plot.
    """
    step_x, step_loss = _points(rows, "step", "loss")
    train_x, train_loss = _points(rows, "epoch", "train_loss")
    val_x, val_loss = _points(rows, "epoch", "val_loss")
    acc_x, val_acc = _points(rows, "epoch", "val_accuracy")
    if not (step_x or train_x or val_x or acc_x):
        raise FinloraError("nothing to plot: no step loss and no epoch train/val loss or accuracy")

    has_loss = bool(step_x or train_x or val_x)
    panels = int(has_loss) + int(bool(acc_x))
    heights = [3, 1.6][:panels] if has_loss else [1.6]
    fig, grid = plt.subplots(
        panels,
        1,
        sharex=True,
        squeeze=False,
        figsize=(8, 2.2 + 1.3 * sum(heights)),
        gridspec_kw={"height_ratios": heights},
    )
    axes: list[Axes] = list(grid[:, 0])
    epoch_steps = sorted(set(train_x + val_x + acc_x))

    if has_loss:
        ax = axes[0]
        _draw_losses(ax, (step_x, step_loss), (train_x, train_loss), (val_x, val_loss))
        ax.set_title("Training loss")
    if acc_x:
        ax = axes[-1]
        ax.plot(acc_x, val_acc, "D-", color=_VAL_COLOR, label="val accuracy")
        for x, y in zip(acc_x, val_acc, strict=True):
            ax.annotate(
                f"{y:.3f}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
        ax.set_ylabel("accuracy")
        low = min(val_acc)
        ax.set_ylim(max(0.0, low - 0.1), 1.05)
        ax.legend(loc="lower right")
        if not has_loss:
            ax.set_title("Validation accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        for x in epoch_steps:
            ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
    axes[-1].set_xlabel("step (dotted lines: end of epoch)" if epoch_steps else "step")
    return _save(fig, path)


def _draw_losses(
    ax: Axes,
    step: tuple[list[float], list[float]],
    train: tuple[list[float], list[float]],
    val: tuple[list[float], list[float]],
) -> None:
    step_x, step_loss = step
    if step_x:
        many = len(step_x) >= 10
        ax.plot(
            step_x,
            step_loss,
            color=_STEP_COLOR,
            alpha=0.3 if many else 0.8,
            linewidth=1,
            label="train loss (step)",
        )
        if many:
            # Heavier smoothing for longer runs; ~the last 10% of steps dominate the average.
            weight = min(0.95, 1 - 10 / len(step_x))
            ax.plot(
                step_x,
                _ema(step_loss, weight),
                color=_STEP_COLOR,
                linewidth=2,
                label="train loss (smoothed)",
            )
    if train[0]:
        ax.plot(*train, "o--", color="tab:green", markersize=7, label="train loss (epoch)")
    if val[0]:
        ax.plot(*val, "s--", color=_VAL_COLOR, markersize=7, label="val loss (epoch)")
    ax.set_ylabel("cross-entropy loss")
    ax.legend(loc="upper right")


def plot_reliability_diagram(
    confidence: np.ndarray, correct: np.ndarray, path: Path, n_bins: int = 15
) -> Path:
    """Calibration plot: accuracy per confidence bin against the diagonal, ECE in the title.

    A lower panel shows how many predictions fall in each bin, since a badly calibrated bin
    with three examples matters less than one with three hundred. Raises as
    `metrics.calibration_bins`.
    """
    bins = calibration_bins(confidence, correct, n_bins)
    ece = expected_calibration_error(confidence, correct, n_bins)
    lefts, width = bins.edges[:-1], 1.0 / n_bins
    filled = bins.count > 0

    fig, (ax, hist) = plt.subplots(
        2, 1, sharex=True, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.bar(
        lefts[filled],
        bins.accuracy[filled],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.6,
        label="accuracy",
    )
    # Gap between what the model claimed and what it achieved, drawn on top of each bar.
    gap_low = np.minimum(bins.accuracy[filled], bins.confidence[filled])
    gap = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    ax.bar(
        lefts[filled],
        gap,
        bottom=gap_low,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.35,
        edgecolor="tab:red",
        hatch="//",
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE = {ece:.3f}, n = {int(bins.count.sum())})")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)

    hist.bar(
        lefts, bins.count, width=width, align="edge", color="grey", edgecolor="black", linewidth=0.6
    )
    hist.set_ylabel("count")
    hist.set_xlabel("confidence (probability of predicted label)")
    hist.grid(alpha=0.3)
    return _save(fig, path)


def _percent(share: float) -> str:
    """A share as a short percentage: 100%, 5.3%, 0.0086% (two significant digits below 10%)."""
    percent = 100 * share
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


def plot_method_comparison(
    rows: Sequence[dict[str, Any]],
    path: Path,
    scores: Sequence[tuple[str, str]] = (("accuracy", "accuracy"), ("macro_f1", "macro-F1")),
    title: str = "Tuning methods",
) -> Path:
    """Bars of two test scores in [0, 1] per tuning method, trainable share under each name.

    `rows` are `finlora compare` table rows: `method`, `trainable_share`, and the `scores` keys
    (each `(key, name)`), optionally with `<key>_std` (drawn as error bars).
    Raises FinloraError when there is no row.
    """
    if not rows:
        raise FinloraError("nothing to plot: no method in the comparison")
    x = np.arange(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.8))
    (first_key, first), (second_key, second) = scores
    for shift, key, color, name in (
        (-width / 2, first_key, _STEP_COLOR, first),
        (width / 2, second_key, _VAL_COLOR, second),
    ):
        values = [float(r[key]) for r in rows]
        errors = [float(r.get(f"{key}_std") or 0.0) for r in rows]
        bars = ax.bar(
            x + shift,
            values,
            width,
            yerr=errors if any(errors) else None,
            capsize=3,
            color=color,
            label=name,
        )
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(
        x,
        labels=[f"{r['method']}\n{_percent(float(r['trainable_share']))}\ntrained" for r in rows],
    )
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test score")
    ax.set_title(f"{title}: {first} and {second} by tuning method")
    ax.legend(loc="best")  # out of the bars, high scores or low
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_score_histogram(scores: Sequence[float], path: Path, title: str = "") -> Path:
    """Histogram of per-answer scores in [0, 1] (e.g. ROUGE-L), with the mean marked."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = np.asarray(scores, dtype=float)
    ax.hist(values, bins=[i / 20 for i in range(21)], color=_STEP_COLOR, edgecolor="white")
    if values.size:
        ax.axvline(values.mean(), color=_VAL_COLOR, label=f"mean {values.mean():.3f}")
        ax.legend(loc="upper right")
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    ax.set_ylabel("answers")
    ax.set_title(title or "Score per answer", fontsize=10)
    return _save(fig, path)


def plot_report_profile(
    probs: np.ndarray,
    labels: Sequence[str],
    sections: Sequence[dict[str, Any]],
    path: Path,
    title: str = "",
) -> Path:
    """A report read from start to end: each label's probability, as a moving average over a
    window of sentences, with the sections' first sentences marked; below it, the share of each
    label predicted in every section (the 20 largest sections, in document order).

    `probs` is (N, K) in `labels` order; `sections` are `ReportAnalysis.sections()` entries.
    Raises FinloraError when there is no sentence.
    """
    n = len(probs)
    if n == 0:
        raise FinloraError("nothing to plot: the report has no scored sentence")
    window = max(1, min(25, n // 10))
    shown = sorted(sorted(sections, key=lambda s: -s["sentences"])[:20],
                   key=lambda s: s["first_sentence"])  # fmt: skip
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 6.5 if len(shown) > 1 else 4.2),
        height_ratios=[3, 2] if len(shown) > 1 else [1, 0.001],
    )  # fmt: skip
    x = np.arange(1, n + 1)
    kernel = np.ones(window) / window
    for j, label in enumerate(labels):
        # Moving average; the ends use the shorter windows they have.
        smooth = np.convolve(probs[:, j], kernel, mode="same") / np.convolve(
            np.ones(n), kernel, mode="same"
        )
        top.plot(x, smooth, label=label, linewidth=1.6)
    for s in sections[1:]:
        top.axvline(s["first_sentence"] + 0.5, color="grey", alpha=0.25, linewidth=0.8)
    top.set_xlim(1, max(n, 2))
    top.set_ylim(0, 1)
    top.set_xlabel("sentence")
    top.set_ylabel(f"probability ({window}-sentence mean)")
    top.set_title(title or "Label probabilities through the report", fontsize=10)
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    if len(shown) > 1:
        left = np.zeros(len(shown))
        y = np.arange(len(shown))
        for label in labels:
            shares = np.array([s["shares"][label] for s in shown])
            bottom.barh(y, shares, left=left, label=label)
            left += shares
        names = [f"{s['title'][:40]} ({s['sentences']})" for s in shown]
        bottom.set_yticks(y, labels=names, fontsize=7)
        bottom.invert_yaxis()
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("share of the section's sentences (sentences in brackets)")
    else:
        bottom.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def plot_report_comparison(
    rows: Sequence[dict[str, Any]], labels: Sequence[str], path: Path
) -> Path:
    """Several reports side by side: each one's label shares as a stacked bar, in the order
    given (e.g. quarter by quarter), its tone written beside it where the labels have one.

    `rows` are `report.comparison` rows. Raises FinloraError when there is no row.
    """
    if not rows:
        raise FinloraError("nothing to plot: no report to compare")
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for j, label in enumerate(labels):
        shares = np.array([float(r["shares"][label]) for r in rows])
        ax.barh(y, shares, left=left, label=label, color=f"C{j % 10}")
        left += shares
    for i, r in enumerate(rows):
        if r["tone"] is not None:
            ax.text(1.01, i, f"tone {r['tone']:+.2f}", va="center", fontsize=8)
    names = [f"{Path(str(r['report'])).name[:40]} ({r['sentences']})" for r in rows]
    ax.set_yticks(y, labels=names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the report's sentences (sentences in brackets)")
    ax.set_title("Label shares by report", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(rows) < 4 else -0.12),
              ncol=len(labels), fontsize=8)  # fmt: skip
    return _save(fig, path)


def plot_suite(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: Path,
    title: str = "Suite",
    scores: Sequence[tuple[str, str]] = (("accuracy", "accuracy"), ("macro_f1", "macro-F1")),
) -> Path:
    """Grouped bars of a suite: a group per set, a bar per model (tuned, zero-shot, K-shot),
    one panel per score in [0, 1].

    `results` maps set -> model -> {score key: value}, every set with the same models (the
    mean over sets is a set like the others). Raises FinloraError when there is no set.
    """
    if not results:
        raise FinloraError("nothing to plot: no set in the suite")
    sets = list(results)
    models = list(next(iter(results.values())))
    x = np.arange(len(sets))
    width = 0.8 / len(models)
    fig, grid = plt.subplots(
        len(scores), 1, squeeze=False, figsize=(max(6.0, 0.5 * len(sets) * len(models) + 2.5), 7)
    )
    slanted = sum(len(s) for s in sets) > 10 * len(sets)  # long names would run into each other
    for ax, (key, name) in zip(grid[:, 0], scores, strict=True):
        for j, model in enumerate(models):
            values = [float(results[s][model][key]) for s in sets]
            shift = (j - (len(models) - 1) / 2) * width
            bars = ax.bar(x + shift, values, width, color=f"C{j % 10}", label=model)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
        ax.set_xticks(
            x, labels=sets, rotation=20 if slanted else 0, ha="right" if slanted else "center"
        )
        ax.set_ylim(0, 1.1)
        ax.set_ylabel(name)
        ax.grid(axis="y", alpha=0.3)
    grid[0, 0].set_title(title)
    handles, names = grid[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(models), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # the legend below the panels, clear of the bars
    return _save(fig, path)
