"""The commands that use a trained run: `predict`, `analyze`, `export` and `serve` (`eval` has
its own module)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from finlora.cli.options import (
    as_json_option,
    echo_err,
    no_progress_option,
    overwrite_option,
    run_dir_argument,
    speed_option,
    trust_remote_code_option,
    zero_shot_option,
)
from finlora.errors import FinloraError

if TYPE_CHECKING:
    pass


def note_unfinished(run: Any, does: str) -> None:
    """A note on a run whose training stopped before its manifest (killed, interrupted)."""
    if not run.manifest.is_file():
        echo_err(
            f"note: {run.root} has no manifest.json: its training did not finish, so this "
            f"{does} the best adapter it saved so far"
        )


# What --data / --file may be; the run's data.format besides.
_FILE_FORMATS = ("auto", "fpb", "csv", "tsv", "jsonl", "parquet", "xlsx", "hf")


def read_options(what: str) -> Any:
    """--format, --text-column, --label-column and --label-map for reading `what`; each left
    out (None) is the run's own, from its config.yaml."""

    def add(fn: Any) -> Any:
        for option in reversed([
            click.option("--format", "fmt", type=click.Choice(_FILE_FORMATS),
                          help=f"How {what} reads (default: by its suffix, else as the run's "
                          "data; hf: a datasets directory from save_to_disk)."),
            click.option("--text-column",
                         help="Column holding the text (default: the run's data.text_column)."),
            click.option("--label-column",
                         help="Column holding the label (default: the run's data.label_column)."),
            click.option("--label-map",
                         help='Raw label -> label name, e.g. "0=negative,1=neutral,2=positive" '
                         "(default: the run's data.label_map; with none, the raw labels are "
                         "the names)."),
        ]):  # fmt: skip
            fn = option(fn)
        return fn

    return add


@click.command()
@run_dir_argument
@click.argument("texts", nargs=-1)
@click.option(
    "--file",
    "file",
    type=click.Path(path_type=Path),
    help="A table (CSV/TSV, JSONL or a .json list, Parquet, .xlsx, a datasets directory), or "
    "plain text with one sentence a line (.txt); - for stdin.",
)
@read_options("--file")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write predictions to .csv or .jsonl, beside every column of the --file and its true "
    "label where it has the label column.",
)
@as_json_option("Print one JSON object per input line (with --out too).")
@zero_shot_option()
@speed_option
@trust_remote_code_option
def predict(
    run_dir: Path,
    texts: tuple[str, ...],
    file: Path | None,
    fmt: str | None,
    text_column: str | None,
    label_column: str | None,
    label_map: str | None,
    out: Path | None,
    as_json: bool,
    zero_shot: bool,
    speed: tuple[str, ...],
    trust_remote_code: bool,
) -> None:
    """Label new sentences with a trained run; reads stdin when no text or file is given.

    A --file table is read with the run's own columns and label map (those it was trained
    on) unless the options below say otherwise. --out keeps every column of the file, adds
    the predicted label and one probability per label, and the true label where the file has
    the label column (mapped to the run's names; with no label map, the raw labels are the
    names, e.g. Bullish / Bearish). A .csv is written with the input's delimiter, and its
    byte-order mark where it had one.

    \b
    Example:
      finlora predict runs/fpb "Net sales fell 12 % to EUR 3.1 mn."
      finlora predict runs/fpb --file news.csv --text-column headline --out labelled.csv
      finlora predict runs/tweets --file sheet.xlsx --out sheet-labelled.csv
      cat headlines.txt | finlora predict runs/fpb --json
    """
    from finlora.labelling import InputOptions, label_texts

    options = InputOptions(fmt, text_column, label_column, label_map)
    predictions = label_texts(
        run_dir, texts, file, options=options, out=out, zero_shot=zero_shot,
        trust_remote_code=trust_remote_code, speed=speed, log=echo_err,
    )  # fmt: skip
    if out is not None and not as_json:
        return
    for p in predictions:
        if as_json:
            click.echo(json.dumps(p.to_dict()))
        else:
            probs = "  ".join(f"{k} {v:.3f}" for k, v in p.probabilities.items())
            click.echo(f"{p.label:<10} [{probs}]  {p.text}")


@click.command()
@run_dir_argument
@click.argument("reports", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), help="Directory for sentences.csv, "
              "summary.json and profile.png (several reports: a folder each, and "
              "comparison.csv and comparison.png).")  # fmt: skip
@click.option("--top", default=5, show_default=True, help="Sentences to show for each label.")
@as_json_option("Print the summary as one JSON object.")
@zero_shot_option()
@overwrite_option()
@no_progress_option()
@speed_option
@trust_remote_code_option
def analyze(
    run_dir: Path,
    reports: tuple[str, ...],
    out: Path | None,
    top: int,
    as_json: bool,
    zero_shot: bool,
    overwrite: bool,
    no_progress: bool,
    speed: tuple[str, ...],
    trust_remote_code: bool,
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
    from finlora.analyze import analyze_reports
    from finlora.report import comparison, format_comparison, format_summary

    analyses = analyze_reports(
        run_dir, reports, out=out, top=top, zero_shot=zero_shot, overwrite=overwrite,
        progress=not no_progress, trust_remote_code=trust_remote_code, speed=speed, log=echo_err,
    )  # fmt: skip
    if len(analyses) == 1:
        summary = analyses[0].summary(top)
        click.echo(json.dumps(summary) if as_json else format_summary(summary))
    elif as_json:
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


@click.command()
@run_dir_argument
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
@overwrite_option()
@trust_remote_code_option
@as_json_option("Print the result as one JSON object.")
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
    trust_remote_code: bool,
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
    note_unfinished(run, "exports")
    result = export_run(run_dir, options, log=echo_err, trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    for line in result.summary():
        click.echo(line)


def _serve_limit_options(fn: Any) -> Any:
    """An option for each of ServeLimits' fields (--max-body-bytes, ...), with its default and
    help; the command gets them as keyword arguments of the same names."""
    from dataclasses import fields

    from finlora.serve_limits import ServeLimits

    for f in reversed(fields(ServeLimits)):
        option = "--" + f.name.replace("_", "-")
        fn = click.option(
            option, f.name, type=int, default=f.default, show_default=True, help=f.metadata["help"]
        )(fn)
    return fn


@click.command()
@run_dir_argument
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 opens it to the network (set FINLORA_API_KEY).",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@zero_shot_option("Serve the base model without the adapter.")
@_serve_limit_options
@speed_option
@trust_remote_code_option
def serve(
    run_dir: Path,
    host: str,
    port: int,
    zero_shot: bool,
    speed: tuple[str, ...],
    trust_remote_code: bool,
    **limits: int,
) -> None:
    """Serve a trained run over HTTP: /predict for a classification run, /generate and an
    OpenAI-style /v1/chat/completions for an instruct run; /health, /info, and /docs. With
    $FINLORA_API_KEY set, requests need `Authorization: Bearer $FINLORA_API_KEY`.

    Each request is held to the limits below: a body over --max-body-bytes is refused with 413
    before it is read; a text, list or answer length past its limit with 422 naming the field;
    and with --queue-size requests already in the server, a new one gets 503 and Retry-After.
    /info lists the limits. /predict answers a label and probabilities for each text, in order;
    `"echo": true` in the body repeats the texts too (and the instruction and input of
    /generate).

    \b
    Example:
      finlora serve runs/fpb
      finlora serve runs/fpb --max-texts 64 --queue-size 16
      curl -s localhost:8000/predict -H 'content-type: application/json' \\
          -d '{"texts": ["Net sales fell 12 % to EUR 3.1 mn."]}'
    """
    import uvicorn

    from finlora.inference import load_run
    from finlora.runs import RunDir
    from finlora.serve import check_bindable, create_app, is_loopback
    from finlora.serve_limits import ServeLimits
    from finlora.serve_schema import API_KEY_ENV, ROUTES

    serve_limits = ServeLimits(**limits)  # a bad limit fails before the model loads
    RunDir(run_dir).require_trained()
    check_bindable(host, port)  # before the model loads (~20 s): a taken port fails at once
    api_key = os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and api_key is None:
        echo_err(
            f"serving on {host} without ${API_KEY_ENV}: anyone who can reach this machine can "
            "use the model"
        )
    loaded = load_run(
        run_dir, zero_shot=zero_shot, trust_remote_code=trust_remote_code, speed=speed
    )
    routes = ", ".join(ROUTES[loaded.task])
    echo_err(f"finlora serve: {run_dir} ({loaded.task}): POST {routes}; API docs at /docs")
    app = create_app(loaded, api_key, serve_limits)
    uvicorn.run(app, host=host, port=port, log_level="info")
