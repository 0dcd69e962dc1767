"""Labelling text in bulk with a classification run (`finlora predict`): texts from arguments, a
file or standard input in; predictions out, to the caller or to a .csv / .jsonl file that keeps
every input column beside them."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from finlora import atomic
from finlora.config import DataConfig
from finlora.data.loaders import InputRows
from finlora.errors import FinloraError
from finlora.inference import Prediction, load_run, require_task

Log = Callable[[str], None]


@dataclass(frozen=True)
class InputOptions:
    """How `finlora predict --file` reads a table; None: as the run read its own data
    (`loaders.run_reading`)."""

    format: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    label_map: str | None = None


def _file_rows(file: Path, text: str | None, options: InputOptions, data: DataConfig) -> InputRows:
    """The rows of `file` (`text`: standard input's), read as `options` say, else as the run
    read its own data."""
    from finlora.data.loaders import format_for, load_inputs, parse_label_map, run_reading
    from finlora.data.tables import TABLE_FORMATS, check_columns

    run = run_reading(data, file)
    fmt = options.format
    if fmt is None:
        # A .txt file (or standard input) holds sentences one a line: texts to label are more
        # often a plain list than Financial PhraseBank or a table saved as .txt.
        plain = text is not None or file.suffix.lower() == ".txt"
        fmt = "auto" if plain else format_for(file, run)
        fmt = "auto" if fmt == "fpb" else fmt
    label_column = options.label_column or run.label_column
    label_map = run.label_map if options.label_map is None else options.label_map
    rows = load_inputs(
        file,
        text,
        fmt,
        text_column=options.text_column or run.text_column,
        label_column=label_column,
        label_map=parse_label_map(label_map) if label_map else None,
    )
    if options.label_column and fmt in TABLE_FORMATS and rows.labels is None:
        check_columns(file, [label_column], rows.columns)
    return rows


def read_inputs(
    texts: Sequence[str],
    file: Path | None,
    options: InputOptions | None = None,
    data: DataConfig | None = None,
    stdin: TextIO | None = None,
) -> InputRows:
    """The rows to label: the arguments, the rows of `file` (`-`: standard input), or, with
    neither, the lines of `stdin` (sys.stdin by default). `data` is the run's data section: a
    file is read with its format, columns and label map where `options` names none.

    Raises FinloraError for both at once, a blank argument, a report given as a file (that is
    `finlora analyze`'s) and no input at all on a terminal.
    """
    from finlora.data.textfile import STDIN, from_terminal, read_stream

    stdin = sys.stdin if stdin is None else stdin
    options = options or InputOptions()
    if texts and file:
        raise FinloraError("give texts as arguments or --file, not both")
    if file is not None and str(file) != "-":
        from finlora.data.documents import HTML_SUFFIXES

        if file.suffix.lower() in (".pdf", *HTML_SUFFIXES):
            raise FinloraError(
                f"{file}: --file reads sentences (CSV/TSV, JSONL, Parquet, Excel, one a line); "
                "read a report with finlora analyze RUN REPORT"
            )
        return _file_rows(file, None, options, data or DataConfig())
    if texts and tuple(texts) != ("-",):
        if not all(t.strip() for t in texts):
            raise FinloraError("a text argument is blank")
        lines = [from_terminal(t).strip() for t in texts]
        return InputRows(["text"], [{"text": t} for t in lines], lines, ["argument"] * len(lines))
    if file is None and not texts and stdin.isatty():
        raise FinloraError("no input: give texts as arguments, --file PATH, or lines on stdin")
    return _file_rows(Path(STDIN), read_stream(stdin), options, data or DataConfig())


def write_predictions(
    out: Path,
    rows: InputRows,
    predictions: Sequence[Prediction],
    labels: Sequence[str],
    bom: bool = False,
) -> None:
    """`predictions` to `out` beside every column of the input `rows`, and the true label where
    the input had one: one JSON object a line for .jsonl (the probabilities as one object),
    else a CSV with a p_LABEL column per label, in the input's delimiter and, with `bom`, behind
    a UTF-8 byte-order mark (so Excel reads it as UTF-8).

    An input column named as one of these (a file predicted on before) is replaced by it.
    """
    true = ["true_label"] if rows.labels is not None else []
    gold: Sequence[str | None] = rows.labels if rows.labels is not None else [None] * len(rows.rows)
    if out.suffix.lower() == ".jsonl":
        added = [*true, "predicted", "probabilities"]
        kept = [c for c in rows.columns if c not in added]
        lines = []
        for row, label, p in zip(rows.rows, gold, predictions, strict=True):
            ours = [label] if true else []
            values = [*(row.get(c) for c in kept), *ours, p.label, p.probabilities]
            lines.append(json.dumps(dict(zip([*kept, *added], values, strict=True)), default=str))
        atomic.write_text(out, "".join(line + "\n" for line in lines))
        return
    added = [*true, "predicted", *(f"p_{label}" for label in labels)]
    kept = [c for c in rows.columns if c not in added]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=rows.delimiter)
    writer.writerow([*kept, *added])
    for row, label, p in zip(rows.rows, gold, predictions, strict=True):
        cells = ["" if row.get(c) is None else row[c] for c in kept]
        ours = [label] if true else []
        writer.writerow([*cells, *ours, p.label, *(p.probabilities[x] for x in labels)])
    atomic.write_text(out, ("\ufeff" if bom else "") + buffer.getvalue())


def note_overflow(codec: Any, total: int, what: str, log: Log) -> None:
    """Say through `log` when inputs were cut to fit the run's data.max_length."""
    fix = f"the run was trained to read {codec.max_length} tokens at most"
    note = codec.overflow.note(0, total, what, codec.max_length, fix)
    if note:
        log(f"note: {note}")


def label_texts(
    run_dir: Path,
    texts: Sequence[str] = (),
    file: Path | None = None,
    *,
    options: InputOptions | None = None,
    out: Path | None = None,
    zero_shot: bool = False,
    trust_remote_code: bool = False,
    speed: Sequence[str] = (),
    log: Log,
) -> list[Prediction]:
    """Label the rows `read_inputs` finds with the classification run in `run_dir`; with
    `out`, also write them there (`write_predictions`). Returns the predictions.

    Everything that can fail on user input (the output file, the run's task, the texts) is
    checked before the model loads.
    """
    from finlora.data.textfile import has_bom

    if out is not None:
        atomic.check_output_file(out, (".csv", ".jsonl"))
    run = require_task(run_dir, "classify", "finlora generate or finlora chat", speed)
    rows = read_inputs(texts, file, options, run.config.data)
    if not rows.texts:
        raise FinloraError("no input text")
    for note in rows.notes():
        log(f"note: {note}")
    loaded = load_run(run, zero_shot=zero_shot, trust_remote_code=trust_remote_code)
    predictions = loaded.predict(rows.texts, progress=len(rows.texts) > 50)
    note_overflow(loaded.codec, len(rows.texts), "text(s)", log)
    if out is not None:
        bom = file is not None and str(file) != "-" and has_bom(file)
        write_predictions(out, rows, predictions, loaded.labels, bom)
        log(f"wrote {len(predictions)} predictions to {out}")
    return predictions
