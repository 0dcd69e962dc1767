"""Evaluation of a classification run: accuracy, F1, confusion matrix and calibration, on its
own held-out test rows or on any labelled file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finlora import atomic
from finlora.data import Example
from finlora.data.prepare import load_labelled
from finlora.errors import FinloraError
from finlora.evaluate.common import data_report_stem, report_title
from finlora.inference import LoadedRun
from finlora.metrics import classification_metrics, format_classification_report
from finlora.plots import plot_confusion_matrix, plot_reliability_diagram


@dataclass
class EvalData:
    name: str  # report file stem, e.g. "test" or "sentences"
    description: str
    examples: list[Example]


@dataclass
class LoaderOptions:
    """How to read a labelled file given with `finlora eval --data`."""

    format: str = "auto"
    agreement: str = "all"
    text_column: str = "text"
    label_column: str = "label"
    label_map: str | None = None


def _run_test_rows(loaded: LoadedRun) -> EvalData:
    """The exact rows the run held out, after checking the data has not changed since."""
    description, rows = loaded.run.test_rows()
    return EvalData("test", description, rows)


def _file_rows(loaded: LoadedRun, path: Path, options: LoaderOptions) -> EvalData:
    examples = load_labelled(
        path,
        options.format,
        agreement=options.agreement,
        text_column=options.text_column,
        label_column=options.label_column,
        label_map=options.label_map,
        labels=loaded.labels,
    )
    unknown = sorted({e.label for e in examples} - set(loaded.labels))
    if unknown:
        where = next(e.source for e in examples if e.label in unknown)
        raise FinloraError(
            f"{where}: unknown label {unknown[0]!r} (the run knows {', '.join(loaded.labels)})"
        )
    return EvalData(data_report_stem(path, options.agreement), str(path), examples)


def evaluate_classify(
    loaded: LoadedRun, data_path: Path | None, options: LoaderOptions, progress: bool = True
) -> dict[str, Any]:
    """Score a classification run on its test split or a labelled file, write the reports."""
    data = (
        _file_rows(loaded, data_path, options) if data_path is not None else _run_test_rows(loaded)
    )
    probs = loaded.proba([e.text for e in data.examples], progress)
    predicted = [loaded.labels[i] for i in probs.argmax(1)]
    gold = [e.label for e in data.examples]
    metrics = classification_metrics(gold, predicted, probs, loaded.labels)
    stem = f"{'zero-shot-' if loaded.zero_shot else ''}{data.name}"
    metrics.update(
        {
            "data": data.description,
            "zero_shot": loaded.zero_shot,
            "synthetic": loaded.run.split.synthetic and data_path is None,
        }
    )
    metrics["report_files"] = _write_reports(loaded, stem, metrics, probs, gold)
    return metrics


def _write_reports(
    loaded: LoadedRun, stem: str, metrics: dict[str, Any], probs: np.ndarray, gold: list[str]
) -> dict[str, str]:
    out = loaded.run.dir.eval_dir
    title = report_title(loaded, stem)
    files = {
        "json": out / f"{stem}.json",
        "text": out / f"{stem}.txt",
        "confusion_matrix": out / f"{stem}_confusion.png",
        "reliability": out / f"{stem}_reliability.png",
    }
    atomic.write_json(files["json"], metrics)
    atomic.write_text(files["text"], format_classification_report(metrics, title) + "\n")
    plot_confusion_matrix(
        metrics["confusion_matrix"],
        loaded.labels,
        files["confusion_matrix"],
        title=f"Confusion matrix - {title}",
    )
    confidence = probs.max(1)
    correct = np.array([loaded.labels[i] == g for i, g in zip(probs.argmax(1), gold, strict=True)])
    plot_reliability_diagram(confidence, correct, files["reliability"])
    return {k: str(v) for k, v in files.items()}
