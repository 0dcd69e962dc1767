"""`finlora eval`: a run on its own test split, a labelled file, or a suite of sets, with the
zero- and few-shot baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from finlora.cli.options import (
    as_json_option,
    echo_err,
    no_progress_option,
    run_dir_argument,
    speed_option,
    trust_remote_code_option,
    zero_shot_option,
)
from finlora.cli.runs import note_unfinished, read_options
from finlora.errors import FinloraError

if TYPE_CHECKING:
    from finlora.runs import Run


def _check_eval(run: Run, zero_shot: bool, classification_options: dict[str, bool]) -> None:
    """Refuse an option that only a classification file reads when `run` is an instruct or a
    preference run (it would be silently ignored), and note a run whose training did not
    finish."""
    records = {
        "instruct": "an instruct run (its --data is a JSONL of instruction records)",
        "preference": "a preference run (its --data is a JSONL of preference records)",
    }
    for option, was_given in classification_options.items():
        if was_given and run.task in records:
            raise FinloraError(
                f"{option}: reads a classification file; {run.root} is {records[run.task]}"
            )
    if not zero_shot:
        note_unfinished(run.dir, "scores")


# What `eval --suite` and `eval --few-shot` read: any other option given would be ignored.
_BASELINE_READS = {"run_dir", "suite", "few_shot", "zero_shot", "as_json", "no_progress", "speed",
                   "trust_remote_code"}  # fmt: skip


def _check_unread(reads: set[str], why: str) -> None:
    """Refuse an option given on the command line that this evaluation would not read."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name or "")
        if param.name not in reads and source is ParameterSource.COMMANDLINE:
            raise FinloraError(f"{param.opts[0]}: not read {why}")


def _eval_baselines(
    run: Run,
    suite: Path | None,
    few_shot: int | None,
    zero_shot: bool,
    as_json: bool,
    progress: bool,
    trust_remote_code: bool,
) -> None:
    """`eval --suite` (every set, the baselines as rows of their own) or `eval --few-shot`
    alone (the few-shot baseline on the run's test split)."""
    from finlora.evaluate import evaluate_few_shot, evaluate_suite, format_suite, load_suite
    from finlora.metrics import format_classification_report

    if suite is not None:
        _check_unread(_BASELINE_READS, "with --suite (the suite file says how to read each set)")
        report = evaluate_suite(
            run, load_suite(suite), zero_shot=zero_shot, few_shot=few_shot, progress=progress,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        click.echo(json.dumps(report) if as_json else format_suite(report), nl=as_json)
        if not as_json:
            click.echo(f"reports: {report['report_files']['md']} (and .json, .png)")
        return
    _check_unread(
        _BASELINE_READS - {"zero_shot"},
        "with --few-shot alone, which scores the run's test split (name files and the "
        "--zero-shot baseline with --suite)",
    )
    assert few_shot is not None
    metrics = evaluate_few_shot(run, few_shot, progress, trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    title = f"{few_shot}-shot base model on {metrics['data']}"
    click.echo(format_classification_report(metrics, title))
    click.echo(f"reports: {Path(metrics['report_files']['json']).parent}")


@click.command("eval")
@run_dir_argument
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    help="Evaluate on all rows of this labelled file instead of the run's test split.",
)
@read_options("--data")
@click.option(
    "--agreement",
    type=click.Choice(["all", "75", "66", "50"]),
    help="FPB agreement level (default: the run's data.agreement).",
)
@zero_shot_option("Evaluate the base model without the adapter.")
@click.option(
    "--suite",
    type=click.Path(path_type=Path),
    help="A YAML suite of labelled sets (configs/suites/): one table of every set, with the "
    "--zero-shot and --few-shot baselines as rows of their own.",
)
@click.option(
    "--few-shot",
    type=click.IntRange(min=1),
    metavar="K",
    help="The base model with K labelled examples from the run's training split before each "
    "sentence (in-context learning).",
)
@click.option(
    "--max-new-tokens",
    default=128,
    show_default=True,
    help="Longest generated answer (instruct runs; at most 4096 tokens).",
)
@as_json_option("Print one JSON object to stdout.")
@no_progress_option()
@speed_option
@trust_remote_code_option
def eval_(
    run_dir: Path,
    data_path: Path | None,
    fmt: str | None,
    text_column: str | None,
    label_column: str | None,
    label_map: str | None,
    agreement: str | None,
    zero_shot: bool,
    suite: Path | None,
    few_shot: int | None,
    max_new_tokens: int,
    as_json: bool,
    no_progress: bool,
    speed: tuple[str, ...],
    trust_remote_code: bool,
) -> None:
    """Measure a run: accuracy (with its 95 % interval), macro/weighted F1, per-class scores,
    confusion matrix, ECE; for an instruct run, perplexity, BLEU, ROUGE-1/2/L and label answers;
    for a preference run, reward and log-prob accuracy, reward margin and the chosen answers'
    perplexity, beside the run's starting model, and a few sample answers.

    A --data file is read as the run read its own data (format, columns, label map), unless
    the options below say otherwise; with no label map anywhere, the file's labels are the
    label names (Bullish / Bearish stay Bullish / Bearish).

    \b
    Example:
      finlora eval runs/fpb                       # the run's own held-out test rows
      finlora eval runs/fpb --zero-shot           # the base model, for comparison
      finlora eval runs/fpb --data news.csv --text-column headline --label-column y \\
          --label-map "0=negative,1=neutral,2=positive"
      finlora eval runs/fin-instruct --json       # perplexity, bleu, rouge1/2/L, n
      finlora eval runs/fin-dpo                   # reward accuracy against its starting model
      finlora eval runs/fpb --few-shot 5          # the base model reading 5 examples
      finlora eval runs/fpb --suite configs/suites/fin-sentiment.yaml --zero-shot --few-shot 5
    """
    from finlora.evaluate import LoaderOptions, evaluate_run
    from finlora.inference import open_run

    run = open_run(run_dir, speed)  # once: the checks and the evaluation read the same run
    options = LoaderOptions.like_run(
        run.config.data, data_path, fmt, agreement, text_column, label_column, label_map, echo_err
    )
    _check_eval(
        run, zero_shot,
        {"--text-column": text_column is not None, "--label-column": label_column is not None,
         "--label-map": label_map is not None, "--agreement": agreement is not None,
         "--format fpb": fmt == "fpb"},
    )  # fmt: skip
    if suite is not None or few_shot is not None:
        _eval_baselines(
            run, suite, few_shot, zero_shot, as_json, not no_progress, trust_remote_code
        )
        return
    metrics = evaluate_run(
        run, data_path, options, zero_shot, not no_progress, max_new_tokens,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    _print_metrics(metrics, run_dir, zero_shot, as_json)


def _print_metrics(metrics: dict[str, Any], run_dir: Path, zero_shot: bool, as_json: bool) -> None:
    from finlora.evaluate import format_instruct_report, format_preference_report
    from finlora.metrics import format_classification_report

    if metrics.get("prompts_cut"):
        echo_err(
            f"note: {metrics['prompts_cut']} of {metrics['n']} prompts were cut to fit "
            "data.max_length and leave room for --max-new-tokens (their inputs lost their end)"
        )
    if as_json:
        click.echo(json.dumps(metrics))
        return
    title = f"{'zero-shot base model' if zero_shot else run_dir.name} on {metrics['data']}"
    if metrics.get("synthetic"):
        title += " (SYNTHETIC data)"
    if metrics.get("task") == "preference":
        click.echo(format_preference_report(metrics, title))
    elif metrics.get("task") == "instruct":
        click.echo(format_instruct_report(metrics, title))
    else:
        click.echo(format_classification_report(metrics, title))
    click.echo(f"reports: {Path(metrics['report_files']['json']).parent}")
