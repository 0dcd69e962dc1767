"""Evaluation recipe: a run on its own held-out test rows, or on any labelled file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finlora import atomic
from finlora.data import Example
from finlora.data.prepare import load_labelled, prepare_data
from finlora.errors import FinloraError
from finlora.metrics import classification_metrics, format_classification_report
from finlora.models.loading import sha256_file
from finlora.plots import plot_confusion_matrix, plot_reliability_diagram
from finlora.predict import LoadedRun, load_run


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


def check_training_files(loaded: LoadedRun) -> None:
    """Refuse to rebuild a split from data files that are gone or changed since training."""
    recorded = loaded.split.get("files", {})
    for path, digest in recorded.items():
        if not Path(path).is_file():
            raise FinloraError(
                f"{path}: training data not found (pass --data to evaluate on a file)"
            )
        if sha256_file(Path(path)) != digest:
            raise FinloraError(
                f"{path}: changed since training (sha256 differs); cannot rebuild the test split"
            )


def _run_test_rows(loaded: LoadedRun) -> EvalData:
    """The exact rows the run held out, after checking the data has not changed since."""
    check_training_files(loaded)
    data = prepare_data(loaded.cfg.data, loaded.cfg.seed)
    if any(i >= len(data.examples) for i in loaded.split["test"]):
        raise FinloraError(
            f"{loaded.run.split}: test rows past the data's {len(data.examples)} examples"
        )
    test = [data.examples[i] for i in loaded.split["test"]]
    return EvalData("test", f"test split of {data.description}", test)


def data_report_stem(path: Path, *variant: str) -> str:
    """The report name for `eval --data FILE`: "data-<stem>-<6 hex digits of its absolute path
    and variant>". Never "test", the run's own held-out split (which export quotes), and never
    that of another file with the same name."""
    key = "\0".join([str(path.resolve()), *variant])
    return f"data-{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"


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


def evaluate_run(
    run_dir: Path,
    data_path: Path | None = None,
    options: LoaderOptions | None = None,
    zero_shot: bool = False,
    progress: bool = True,
    max_new_tokens: int = 128,
) -> dict[str, Any]:
    """Score a run (or its base model with `zero_shot`) and write reports under RUN_DIR/eval.

    An instruct run is measured by `instruct_eval.evaluate_instruct` (perplexity, BLEU, ROUGE).

    Returns the metrics dict with `data`, `zero_shot` and `report_files` added.
    """
    loaded = load_run(run_dir, zero_shot)
    if loaded.task == "instruct":
        from finlora.instruct_eval import evaluate_instruct

        return evaluate_instruct(loaded, data_path, max_new_tokens, progress)
    data = (
        _file_rows(loaded, data_path, options or LoaderOptions())
        if data_path is not None
        else _run_test_rows(loaded)
    )
    probs = loaded.proba([e.text for e in data.examples], progress)
    predicted = [loaded.labels[i] for i in probs.argmax(1)]
    gold = [e.label for e in data.examples]
    metrics = classification_metrics(gold, predicted, probs, loaded.labels)
    stem = f"{'zero-shot-' if zero_shot else ''}{data.name}"
    metrics.update(
        {
            "data": data.description,
            "zero_shot": zero_shot,
            "synthetic": bool(loaded.split.get("synthetic")) and data_path is None,
        }
    )
    metrics["report_files"] = _write_reports(loaded, stem, metrics, probs, gold)
    return metrics


def report_title(loaded: LoadedRun, stem: str) -> str:
    """What a report is of: the run (or its zero-shot base model) and the data's stem."""
    return f"{'zero-shot base model' if loaded.zero_shot else loaded.run.root.name}: {stem}"


def _write_reports(
    loaded: LoadedRun, stem: str, metrics: dict[str, Any], probs: np.ndarray, gold: list[str]
) -> dict[str, str]:
    out = loaded.run.eval_dir
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
