"""Labelling text in bulk with a classification run (`finlora predict`): texts from arguments, a
file or standard input in; predictions out, to the caller or to a .csv / .jsonl file."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from finlora import atomic
from finlora.errors import FinloraError
from finlora.inference import Prediction, load_run, require_task

Log = Callable[[str], None]


def read_inputs(
    texts: Sequence[str], file: Path | None, text_column: str, stdin: TextIO | None = None
) -> list[str]:
    """The texts to label: the arguments, the rows of `file` (`-`: standard input), or, with
    neither, the lines of `stdin` (sys.stdin by default).

    Raises FinloraError for both at once, a blank argument, a report given as a file (that is
    `finlora analyze`'s) and no input at all on a terminal.
    """
    from finlora.data.loaders import load_texts
    from finlora.data.textfile import STDIN, from_terminal, read_stream, read_text

    stdin = sys.stdin if stdin is None else stdin
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
    if texts and tuple(texts) != ("-",):
        if not all(t.strip() for t in texts):
            raise FinloraError("a text argument is blank")
        return [from_terminal(t).strip() for t in texts]
    if file is None and not texts and stdin.isatty():
        raise FinloraError("no input: give texts as arguments, --file PATH, or lines on stdin")
    return load_texts(STDIN, read_stream(stdin), text_column)


def write_predictions(out: Path, predictions: Sequence[Prediction], labels: Sequence[str]) -> None:
    """`predictions` to `out`: one JSON object a line for .jsonl, else a CSV of the text, the
    label and one probability column per label."""
    if out.suffix.lower() == ".jsonl":
        atomic.write_text(out, "".join(json.dumps(p.to_dict()) + "\n" for p in predictions))
        return
    header = ["text", "label", *[f"p_{label}" for label in labels]]
    rows = [[p.text, p.label, *[p.probabilities[label] for label in labels]] for p in predictions]
    atomic.write_text(out, atomic.csv_text([header, *rows]))


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
    text_column: str = "text",
    out: Path | None = None,
    zero_shot: bool = False,
    trust_remote_code: bool = False,
    speed: Sequence[str] = (),
    log: Log,
) -> list[Prediction]:
    """Label the texts `read_inputs` finds with the classification run in `run_dir`; with
    `out`, also write them there (`write_predictions`). Returns the predictions.

    Everything that can fail on user input (the output file, the texts, the run's task) is
    checked before the model loads.
    """
    if out is not None:
        atomic.check_output_file(out, (".csv", ".jsonl"))
    inputs = read_inputs(texts, file, text_column)
    if not inputs:
        raise FinloraError("no input text")
    require_task(run_dir, "classify", "finlora generate or finlora chat")
    loaded = load_run(
        run_dir, zero_shot=zero_shot, trust_remote_code=trust_remote_code, speed=speed
    )
    predictions = loaded.predict(inputs, progress=len(inputs) > 50)
    note_overflow(loaded.codec, len(inputs), "text(s)", log)
    if out is not None:
        write_predictions(out, predictions, loaded.labels)
        log(f"wrote {len(predictions)} predictions to {out}")
    return predictions
