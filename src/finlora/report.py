"""Report analysis: a financial document's sentences scored by a classification run.

`finlora.data.documents` reads a report and cuts it into sections and sentences; here the run's
per-sentence probabilities become the report's label shares, its tone by section and the
sentences that carry each label most, several reports are compared side by side, and the
results are written out (CSV, JSON, plots).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finlora.atomic import csv_text
from finlora.data.documents import Segmented, Sentence, segment
from finlora.errors import FinloraError

# ---- the analysis --------------------------------------------------------------------------


def _tone_columns(labels: Sequence[str]) -> tuple[int, int] | None:
    lower = [label.lower() for label in labels]
    if "positive" in lower and "negative" in lower:
        return lower.index("positive"), lower.index("negative")
    return None


@dataclass
class ReportAnalysis:
    """A report's sentences with the run's label probabilities, (N, K) in `labels` order."""

    source: str
    labels: list[str]
    sentences: list[Sentence]
    probs: np.ndarray
    skipped: int

    @functools.cached_property
    def predicted(self) -> list[str]:
        return [self.labels[int(i)] for i in self.probs.argmax(axis=1)]

    def shares(self, rows: Sequence[int] | None = None) -> dict[str, float]:
        """Each label's share of the rows' (all by default) predicted labels."""
        chosen = self.predicted if rows is None else [self.predicted[i] for i in rows]
        return {label: round(chosen.count(label) / len(chosen), 6) for label in self.labels}

    def tone(self, rows: Sequence[int] | None = None) -> float | None:
        """Mean P(positive) - P(negative) over the rows (all by default), for runs whose
        labels include both; None otherwise."""
        columns = _tone_columns(self.labels)
        if columns is None:
            return None
        probs = self.probs if rows is None else self.probs[list(rows)]
        # Six digits, as the probabilities are given: more is float noise, not tone.
        return round(float((probs[:, columns[0]] - probs[:, columns[1]]).mean()), 6)

    def sections(self) -> list[dict[str, Any]]:
        """Consecutive runs of sentences under one heading, in document order."""
        runs: list[tuple[str, list[int]]] = []
        for s in self.sentences:
            if not runs or runs[-1][0] != s.section:
                runs.append((s.section, []))
            runs[-1][1].append(s.index)
        return [
            {"title": title or "(before the first heading)", "first_sentence": rows[0],
             "sentences": len(rows), "tone": self.tone(rows), "shares": self.shares(rows)}
            for title, rows in runs
        ]  # fmt: skip

    def top(self, label: str, k: int) -> list[dict[str, Any]]:
        """The k sentences predicted `label` with the highest probability of it."""
        column = self.labels.index(label)
        rows = [i for i, p in enumerate(self.predicted) if p == label]
        rows.sort(key=lambda i: -self.probs[i, column])
        return [
            {"index": i, "probability": round(float(self.probs[i, column]), 4),
             "section": self.sentences[i].section, "text": self.sentences[i].text}
            for i in rows[:k]
        ]  # fmt: skip

    def summary(self, top: int = 5) -> dict[str, Any]:
        shares = self.shares()
        return {
            "source": self.source,
            "sentences": len(self.sentences),
            "skipped_fragments": self.skipped,
            "labels": {
                label: {
                    "sentences": self.predicted.count(label),
                    "share": shares[label],
                    "mean_probability": round(float(self.probs[:, j].mean()), 6),
                }
                for j, label in enumerate(self.labels)
            },
            "tone": self.tone(),
            "sections": self.sections(),
            "top": {label: self.top(label, top) for label in self.labels},
        }

    def sentences_csv(self) -> str:
        header = ["index", "section", "label", *[f"p_{x}" for x in self.labels], "text"]
        rows = (
            [s.index, s.section, label, *[round(float(p), 6) for p in row], s.text]
            for s, label, row in zip(self.sentences, self.predicted, self.probs, strict=True)
        )
        return csv_text([header, *rows])


def sentences_of(text: str, source: str) -> Segmented:
    """A report's sections and sentences (`segment`), before any model is loaded.

    Raises FinloraError when the text holds no prose sentence.
    """
    parts = segment(text)
    if not parts.sentences:
        raise FinloraError(
            f"{source}: no prose sentence found ({parts.skipped} table rows or fragments)"
        )
    return parts


def score_report(
    parts: Segmented, source: str, labels: Sequence[str], score: Callable[[list[str]], Any]
) -> ReportAnalysis:
    """Score a report's sentences with `score`, which gives (N, K) probabilities in `labels`
    order (a classification run's `proba`); `source` names the report in the summary."""
    probs = np.asarray(score([s.text for s in parts.sentences]), dtype=float)
    return ReportAnalysis(source, list(labels), parts.sentences, probs, parts.skipped)


def analyze(
    text: str, source: str, labels: Sequence[str], score: Callable[[list[str]], Any]
) -> ReportAnalysis:
    """`sentences_of` a report's text (`read_report`), then `score_report`."""
    return score_report(sentences_of(text, source), source, labels, score)


# ---- output --------------------------------------------------------------------------------

SENTENCES_FILE, SUMMARY_FILE, PLOT_FILE = "sentences.csv", "summary.json", "profile.png"
COMPARISON_FILE, COMPARISON_PLOT = "comparison.csv", "comparison.png"


def _write_files(analysis: ReportAnalysis, directory: Path, top: int) -> None:
    from finlora import atomic
    from finlora.plots import plot_report_profile

    summary = analysis.summary(top)
    atomic.write_text(directory / SENTENCES_FILE, analysis.sentences_csv())
    atomic.write_json(directory / SUMMARY_FILE, summary)
    plot_report_profile(
        analysis.probs, analysis.labels, summary["sections"], directory / PLOT_FILE,
        title=f"{Path(analysis.source).name}: label probabilities through the report",
    )  # fmt: skip


def write_analysis(analysis: ReportAnalysis, out: Path, top: int, overwrite: bool) -> Path:
    """Write the sentences (CSV), the summary (JSON) and the profile plot into `out`, which
    appears whole or not at all.

    Raises FinloraError when `out` holds files and `overwrite` is not set.
    """
    from finlora import atomic

    atomic.check_new_dir(out, overwrite)
    with atomic.atomic_dir(out) as tmp:
        _write_files(analysis, tmp, top)
    return out


def _directory_names(sources: Sequence[str]) -> list[str]:
    """A folder name per report: its file stem, numbered where two would clash."""
    names: list[str] = []
    for source in sources:
        stem = re.sub(r"[^\w.-]+", "_", Path(source).stem).strip(".") or "report"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def comparison(analyses: Sequence[ReportAnalysis]) -> list[dict[str, Any]]:
    """One row per report: sentences, label shares and tone, in the order given."""
    return [
        {"report": a.source, "sentences": len(a.sentences), "shares": a.shares(), "tone": a.tone()}
        for a in analyses
    ]


def write_comparison(
    analyses: Sequence[ReportAnalysis], out: Path, top: int, overwrite: bool
) -> list[str]:
    """Each report's files (`write_analysis`) in a folder of its own under `out`, beside
    comparison.csv and comparison.png; `out` appears whole or not at all. Returns the
    folders' names."""
    from finlora import atomic
    from finlora.plots import plot_report_comparison

    atomic.check_new_dir(out, overwrite)
    names = _directory_names([a.source for a in analyses])
    rows = comparison(analyses)
    labels = analyses[0].labels
    with atomic.atomic_dir(out) as tmp:
        for analysis, name in zip(analyses, names, strict=True):
            (tmp / name).mkdir()
            _write_files(analysis, tmp / name, top)
        table = [["report", "folder", "sentences", *[f"share_{x}" for x in labels], "tone"]]
        for row, name in zip(rows, names, strict=True):
            shares = [round(row["shares"][x], 6) for x in labels]
            tone = "" if row["tone"] is None else round(row["tone"], 6)
            table.append([row["report"], name, row["sentences"], *shares, tone])
        atomic.write_text(tmp / COMPARISON_FILE, csv_text(table))
        plot_report_comparison(rows, labels, tmp / COMPARISON_PLOT)
    return names


def _shorten(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def format_summary(summary: dict[str, Any], max_sections: int = 15) -> str:
    """The summary as the terminal shows it: label shares, tone, sections, top sentences."""
    n = summary["sentences"]
    lines = [
        f"{summary['source']}: {n} sentences scored"
        f" ({summary['skipped_fragments']} table rows and fragments skipped)",
        "",
        f"{'label':<12}{'sentences':>10}{'share':>8}{'mean p':>8}",
    ]
    for label, row in summary["labels"].items():
        lines.append(
            f"{label:<12}{row['sentences']:>10}{100 * row['share']:>7.1f}%"
            f"{row['mean_probability']:>8.3f}"
        )
    if summary["tone"] is not None:
        lines.append(f"tone (mean P(positive) - P(negative)): {summary['tone']:+.3f}")
    sections = summary["sections"]
    if len(sections) > 1:
        lines += ["", "sections" + (" (tone)" if summary["tone"] is not None else "") + ":"]
        for s in sections[:max_sections]:
            measure = (
                f"{s['tone']:+.3f}" if s["tone"] is not None
                else "  ".join(f"{k} {100 * v:.0f}%" for k, v in s["shares"].items())
            )  # fmt: skip
            lines.append(f"  {_shorten(s['title'], 48):<50}{s['sentences']:>5}  {measure}")
        if len(sections) > max_sections:
            lines.append(f"  ... {len(sections) - max_sections} more sections")
    for label, rows in summary["top"].items():
        if rows and label.lower() != "neutral":
            lines += ["", f"most {label}:"]
            lines += [f"  {r['probability']:.3f}  {_shorten(r['text'])}" for r in rows]
    return "\n".join(lines)


def format_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """Several reports side by side: sentences, label shares and tone, one line each."""
    labels = list(rows[0]["shares"])
    names = [r["report"] if len(r["report"]) <= 40 else "..." + r["report"][-37:] for r in rows]
    width = max(12, *(len(name) for name in names)) + 2
    has_tone = rows[0]["tone"] is not None
    head = f"{'report':<{width}}{'sentences':>10}" + "".join(f"{x[:9]:>10}" for x in labels)
    lines = [head + (f"{'tone':>9}" if has_tone else "")]
    for name, r in zip(names, rows, strict=True):  # long paths keep their file name
        line = f"{name:<{width}}{r['sentences']:>10}"
        line += "".join(f"{100 * r['shares'][x]:>9.1f}%" for x in labels)
        lines.append(line + (f"{r['tone']:>+9.3f}" if has_tone else ""))
    return "\n".join(lines)
