"""Evaluation: a run on its own held-out test rows, or on any labelled file; one evaluator per
task (classify: accuracy, F1, calibration; instruct: perplexity, BLEU, ROUGE; preference: reward
and log-prob accuracy beside the starting model); suites of labelled sets with the zero-shot and
few-shot baselines beside the run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finlora.evaluate.classify import LoaderOptions, evaluate_classify
from finlora.evaluate.fewshot import evaluate_few_shot
from finlora.evaluate.instruct import evaluate_instruct, format_instruct_report
from finlora.evaluate.preference import evaluate_preference
from finlora.evaluate.preference_report import format_preference_report
from finlora.evaluate.suite import evaluate_suite, format_suite, load_suite
from finlora.inference import load_run, open_run
from finlora.runs import Run

__all__ = [
    "LoaderOptions",
    "evaluate_few_shot",
    "evaluate_run",
    "evaluate_suite",
    "format_instruct_report",
    "format_preference_report",
    "format_suite",
    "load_suite",
]


def evaluate_run(
    run_dir: Path | Run,
    data_path: Path | None = None,
    options: LoaderOptions | None = None,
    zero_shot: bool = False,
    progress: bool = True,
    max_new_tokens: int = 128,
    *,
    trust_remote_code: bool = False,
    speed: Sequence[str] = (),
) -> dict[str, Any]:
    """Score a run (or its base model with `zero_shot`) and write reports under RUN_DIR/eval.

    `run_dir` may be a run already opened (`inference.open_run`, its speed overrides applied).

    Returns the metrics dict with `data`, `zero_shot` and `report_files` added.
    """
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir, speed)
    if run.task == "preference":  # the run and its starting model, on held-out answers
        return evaluate_preference(
            run, data_path, max_new_tokens, progress, zero_shot=zero_shot,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
    loaded = load_run(run, zero_shot=zero_shot, trust_remote_code=trust_remote_code)
    if loaded.task == "instruct":
        return evaluate_instruct(loaded, data_path, max_new_tokens, progress)
    return evaluate_classify(loaded, data_path, options or LoaderOptions(), progress)
