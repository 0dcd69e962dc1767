"""The report-analysis recipe (`finlora analyze`): reports -> sections and sentences -> a
classification run's probabilities -> label shares, tone by section and top sentences
(`finlora.report`), written out where asked; several reports side by side."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from finlora import atomic
from finlora.data.documents import Segmented, read_report, read_report_stream
from finlora.data.textfile import STDIN
from finlora.errors import FinloraError
from finlora.inference import load_run, require_task
from finlora.labelling import note_overflow
from finlora.report import (
    ReportAnalysis,
    score_report,
    sentences_of,
    write_analysis,
    write_comparison,
)

Log = Callable[[str], None]


def read_reports(
    reports: Sequence[str], stdin: TextIO | None = None
) -> list[tuple[Segmented, str]]:
    """Each report (a path, or `-` for `stdin`) cut into sections and sentences, with the name
    it goes by. Raises FinloraError for an unreadable report, one without prose, or `-` twice."""
    if list(reports).count("-") > 1:
        raise FinloraError("standard input (-) can be read once")
    stream = sys.stdin if stdin is None else stdin
    sources = [STDIN if r == "-" else r for r in reports]
    texts = [read_report_stream(stream) if r == "-" else read_report(Path(r)) for r in reports]
    return [
        (sentences_of(text, source), source) for text, source in zip(texts, sources, strict=True)
    ]


def _write(analyses: list[ReportAnalysis], out: Path, top: int, overwrite: bool, log: Log) -> None:
    if len(analyses) == 1:
        write_analysis(analyses[0], out, top, overwrite)
        log(f"wrote {out}/: sentences.csv, summary.json, profile.png")
        return
    names = write_comparison(analyses, out, top, overwrite)
    log(f"wrote {out}/: comparison.csv, comparison.png, and {', '.join(names)}/")


def analyze_reports(
    run_dir: Path,
    reports: Sequence[str],
    *,
    out: Path | None = None,
    top: int = 5,
    zero_shot: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    speed: Sequence[str] = (),
    log: Log,
) -> list[ReportAnalysis]:
    """Score every report's sentences with the classification run in `run_dir`; with `out`,
    write one report's files there (`write_analysis`), or several side by side
    (`write_comparison`). Returns the analyses, in the order given.

    Every report is read and cut into sentences, and `out` checked, before the model loads:
    a bad file is one FinloraError, at once.
    """
    if top < 0:  # checked here, not by click.IntRange: its message calls 'x' "not a valid range"
        raise FinloraError(f"--top: must be 0 or more (got {top})")
    parts = read_reports(reports)
    run = require_task(
        run_dir, "classify", "finlora generate, with the report's text in the prompt", speed
    )
    if out is not None:
        atomic.check_new_dir(out, overwrite)
    loaded = load_run(run, zero_shot=zero_shot, trust_remote_code=trust_remote_code)
    analyses = [
        score_report(
            part, source, loaded.labels,
            lambda t: loaded.proba(t, progress=progress and len(t) > 50),
        )
        for part, source in parts
    ]  # fmt: skip
    note_overflow(loaded.codec, sum(len(a.sentences) for a in analyses), "sentence(s)", log)
    if out is not None:
        _write(analyses, out, top, overwrite, log)
    return analyses
