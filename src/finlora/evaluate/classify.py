"""Evaluation of a classification run: accuracy, F1, confusion matrix and calibration, on its
own held-out test rows or on any labelled file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finlora import atomic
from finlora.calibration import calibrated
from finlora.config import DataConfig
from finlora.data import Example
from finlora.data.loaders import format_for, parse_label_map, reads_as_fpb, repair_note, run_reading
from finlora.data.prepare import load_labelled
from finlora.errors import FinloraError
from finlora.evaluate.common import data_report_stem, report_title
from finlora.inference import LoadedRun
from finlora.metrics import (
    classification_metrics,
    expected_calibration_error,
    format_classification_report,
)
from finlora.plots import plot_confusion_matrix, plot_reliability_diagram


@dataclass
class EvalData:
    name: str  # report file stem, e.g. "test" or "sentences"
    description: str
    examples: list[Example]
    # Each row's source, for the test rows of a run on data.sources (else empty).
    sources: list[str] = field(default_factory=list)


@dataclass
class LoaderOptions:
    """How to read a labelled file given with `finlora eval --data`, and where to say what
    reading it repaired (`log`; None: nowhere)."""

    format: str = "auto"
    agreement: str = "all"
    text_column: str = "text"
    label_column: str = "label"
    label_map: str | None = None
    log: Callable[[str], None] | None = None
    # The label map is the run's own, not one given for this file: a file already written in
    # the run's label names reads as it is.
    runs_label_map: bool = False

    @classmethod
    def like_run(
        cls,
        data: DataConfig,
        path: Path | None,
        fmt: str | None = None,
        agreement: str | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
        label_map: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> LoaderOptions:
        """The options given (not None), the rest as the run read its own data (`data`, its
        data section), to read `path` alike (`loaders.run_reading`)."""
        run = run_reading(data, path) if path is not None else data
        return cls(
            fmt or (format_for(path, run) if path is not None else "auto"),
            agreement or run.agreement,
            text_column or run.text_column,
            label_column or run.label_column,
            label_map if label_map is not None else run.label_map,
            log,
            runs_label_map=label_map is None and run.label_map is not None,
        )


def _run_test_rows(loaded: LoadedRun) -> EvalData:
    """The exact rows the run held out, after checking the data has not changed since; for a
    run on data.sources, with the source of each."""
    description, rows = loaded.run.test_rows()
    split = loaded.run.split
    sources = split.source_names(split.test) if split.sources else []
    return EvalData("test", description, rows, sources)


def _file_rows(loaded: LoadedRun, path: Path, options: LoaderOptions) -> EvalData:
    label_map: str | dict[str, str] | None = options.label_map
    if options.runs_label_map and options.label_map:
        # Financial PhraseBank has its own labels; a table may hold the raw values or names.
        own = {label: label for label in loaded.labels}
        fpb = reads_as_fpb(path, options.format)
        label_map = None if fpb else {**own, **parse_label_map(options.label_map)}
    examples = load_labelled(
        path,
        options.format,
        agreement=options.agreement,
        text_column=options.text_column,
        label_column=options.label_column,
        label_map=label_map,
        labels=loaded.labels,
    )
    note = repair_note(examples)
    if note and options.log is not None:
        options.log(f"note: {note}")
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
    raw = loaded.proba([e.text for e in data.examples], progress, calibrate=False)
    probs = calibrated(raw, loaded.temperature)
    predicted = [loaded.labels[i] for i in probs.argmax(1)]
    gold = [e.label for e in data.examples]
    metrics = classification_metrics(gold, predicted, probs, loaded.labels)
    stem = f"{'zero-shot-' if loaded.zero_shot else ''}{data.name}"
    metrics.update(
        {
            "data": data.description,
            "zero_shot": loaded.zero_shot,
            "synthetic": loaded.run.split.synthetic and data_path is None,
            # The scores as the model gives them, before the run's temperature divides them.
            "temperature": loaded.temperature,
            "ece_uncalibrated": expected_calibration_error(
                raw.max(1), np.array(predicted) == np.array(gold)
            ),
        }
    )
    if data.sources:
        metrics["sources"] = _per_source(loaded, stem, data.sources, probs, gold)
    metrics["report_files"] = write_reports(loaded, stem, metrics, probs, gold)
    return metrics


# What the pooled report repeats of each source; its own report (STEM-NAME.json) has the rest.
SOURCE_SUMMARY = ("n", "accuracy", "macro_f1", "weighted_f1", "ece", "absent_labels", "data")


def _per_source(
    loaded: LoadedRun, stem: str, sources: list[str], probs: np.ndarray, gold: list[str]
) -> dict[str, Any]:
    """Each source's metrics on its own test rows, in the order of the sources; each source's
    reports are written as STEM-NAME.json (and .txt, and the plots)."""
    paths = {s.name: s.path for s in loaded.run.split.sources}
    summary = {}
    for name in dict.fromkeys(sources):
        rows = [i for i, source in enumerate(sources) if source == name]
        own_probs, own_gold = probs[rows], [gold[i] for i in rows]
        predicted = [loaded.labels[i] for i in own_probs.argmax(1)]
        metrics = classification_metrics(own_gold, predicted, own_probs, loaded.labels)
        metrics["data"] = f"test split of {name} ({paths.get(name, '')})"
        metrics["zero_shot"] = loaded.zero_shot
        files = write_reports(loaded, f"{stem}-{name}", metrics, own_probs, own_gold)
        summary[name] = {
            **{k: metrics[k] for k in SOURCE_SUMMARY},
            "report_files": files,
        }
    return summary


def write_reports(
    loaded: LoadedRun,
    stem: str,
    metrics: dict[str, Any],
    probs: np.ndarray,
    gold: list[str],
    title: str | None = None,
) -> dict[str, str]:
    """A classification report under RUN/eval: STEM.json, STEM.txt, its confusion matrix and
    reliability diagram; `title` defaults to the run (or zero-shot base model) and STEM."""
    out = loaded.run.dir.eval_dir
    title = title or report_title(loaded, stem)
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
