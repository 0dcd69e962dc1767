r"""Several runs scored on one run's held-out test rows, source by source.

    .venv/bin/python benchmarks/same_split.py runs/fin-sentiment runs/fpb \
        --split-of runs/fin-sentiment

A multi-source run holds out a test split of each of its sources. This scores every RUN given
(the first is usually that run, the others e.g. the FPB-only recipe's run) on exactly those
rows, so the figures compare like with like: a row another run trained on is marked, since
that run's figure is then not held-out (`trained_on` counts them). Prints a Markdown table of
accuracy (95 % Wilson interval), macro-F1 and ECE per run and source, plus the pool.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from finlora.calibration import calibrated
from finlora.inference import load_run
from finlora.metrics import classification_metrics, wilson_interval
from finlora.runs import Run


def _held_out(split_of: Run, part: str) -> tuple[list[Any], list[str]]:
    """The rows of `split_of`'s `part` (test or validation), and each row's source."""
    indices = split_of.split.test if part == "test" else split_of.split.validation
    if part == "test":
        _, rows = split_of.test_rows()
    else:
        rows = [split_of.prepared().examples[i] for i in indices]
    sources = split_of.split.source_names(indices) or [""] * len(rows)
    return rows, [s or "all" for s in sources]


def _trained_texts(run: Run) -> set[str]:
    data = run.prepared()
    return {data.examples[i].text for i in run.split.train}


def score(run_dir: Path, rows: list[Any], sources: list[str]) -> dict[str, Any]:
    """Metrics of `run_dir` on `rows`, pooled and per source, with its own calibration."""
    loaded = load_run(run_dir)
    trained = _trained_texts(loaded.run)
    probs = calibrated(
        loaded.proba([r.text for r in rows], progress=True, calibrate=False), loaded.temperature
    )
    labels = loaded.labels  # gold labels are names, so runs may order them differently
    result = {}
    for name in ["pool", *dict.fromkeys(sources)]:
        keep = [i for i, s in enumerate(sources) if name in ("pool", s)]
        gold = [rows[i].label for i in keep]
        p = probs[keep]
        predicted = [labels[j] for j in p.argmax(1)]
        m = classification_metrics(gold, predicted, p, labels)
        correct = int(round(m["accuracy"] * len(keep)))
        result[name] = {
            "n": len(keep),
            "accuracy": m["accuracy"],
            "interval": wilson_interval(correct, len(keep)),
            "macro_f1": m["macro_f1"],
            "ece": m["ece"],
            "trained_on": sum(rows[i].text in trained for i in keep),
        }
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| run | set | n | accuracy (95 % CI) | macro-F1 | ECE | rows it trained on |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for run, by_set in results.items():
        for name, m in by_set.items():
            low, high = m["interval"]
            lines.append(
                f"| {run} | {name} | {m['n']} | {m['accuracy']:.4f} ({low:.3f}-{high:.3f}) "
                f"| {m['macro_f1']:.4f} | {m['ece']:.4f} | {m['trained_on']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="classification runs to score")
    parser.add_argument("--split-of", type=Path, required=True, help="whose test rows")
    parser.add_argument(
        "--part",
        choices=("test", "validation"),
        default="test",
        help="which held-out rows: validation is where settings are chosen",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows, sources = _held_out(Run.open(args.split_of), args.part)
    results = {str(run): score(run, rows, sources) for run in args.runs}
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
