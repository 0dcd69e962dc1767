"""Report analysis: a long financial document read sentence by sentence with a classification run.

Annual reports, earnings releases and filings are long prose broken by headings, bullet lists,
tables and page furniture. `read_report` turns one into text (plain text, Markdown, HTML or a
PDF with a text layer), `segment` cuts the text into sections and sentences and sets aside what
is not prose (table rows, page numbers), and `ReportAnalysis` turns the run's per-sentence
probabilities into the report's label shares, its tone by section and the sentences that carry
each label most.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from finlora.data.textfile import read_text
from finlora.errors import FinloraError

# Words that end in a full stop without ending a sentence. Single letters (initials, "U.S.")
# are recognised apart; "mn", "bn" and "m" are not here: in financial prose they usually do
# end the sentence ("... to EUR 3.1 mn.").
# fmt: off
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr",
    "inc", "ltd", "co", "corp",
    "e.g", "i.e", "etc", "vs", "approx", "est", "incl", "excl", "cf", "al", "ca",
    "dept", "div", "no", "nos", "fig", "figs", "ref", "vol", "p", "pp",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})
# fmt: on
# A sentence ends at . ! or ? (closing quotes and brackets included) before white space and a
# capital or a digit, which may follow an opening quote, bracket or dash.
_END = re.compile(
    r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'`\u201c\u2018(\[\-\u2013\u2014]{0,2} ?[A-Z0-9])"
)
_BULLET = re.compile(r"^\s*(?:[-*\u2022\u25aa\u25cf\u2013\u2014]|\(?(?:\d{1,2}|[a-z])[.)])\s+")
_MARKDOWN_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_WORD = re.compile(r"[^\W\d_]{2,}")  # a word of two letters or more
_HYPHEN_BREAK = re.compile(r"(\w)-\n(?=[a-z])")


@dataclass(frozen=True)
class Sentence:
    index: int
    section: str  # the nearest heading above it; "" before the first
    text: str


@dataclass(frozen=True)
class Segmented:
    sentences: list[Sentence]
    skipped: int  # lines or fragments that are not prose: table rows, numbers, page furniture


# ---- reading -------------------------------------------------------------------------------


class _HTMLText(HTMLParser):
    """The visible text of an HTML page, with block elements on lines of their own and headings
    marked as Markdown headings."""

    # fmt: off
    BLOCKS = frozenset({"p", "div", "br", "li", "tr", "table", "section", "article", "header",
                        "footer", "ul", "ol", "dd", "dt"})
    # fmt: on
    HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
    HIDDEN = frozenset({"script", "style", "head", "template", "noscript"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.HIDDEN:
            self._hidden += 1
        elif tag in self.HEADINGS:
            self.parts.append("\n\n# ")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag == "p" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self.HEADINGS or tag == "p":
            self.parts.append("\n\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            # Inside a heading or paragraph, source line breaks are only layout.
            self.parts.append(re.sub(r"\s+", " ", data))


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise FinloraError(f"{path}: the PDF is encrypted; save a decrypted copy first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError) as err:
        raise FinloraError(f"{path}: not a readable PDF ({err})") from None
    text = "\n\n".join(pages)
    if not text.strip():
        raise FinloraError(
            f"{path}: the PDF has no text layer (scanned pages?); run OCR on it first"
        )
    return text


def read_report(path: Path) -> str:
    """The text of a report: .pdf (its text layer), .html/.htm (visible text), anything else
    as text (UTF-8 or Latin-1, as data files are read).

    Raises FinloraError for a missing, empty, binary or unreadable file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        if not path.is_file():
            raise FinloraError(f"{path}: no such file")
        return _pdf_text(path)
    text = read_text(path)
    if suffix in (".html", ".htm"):
        parser = _HTMLText()
        parser.feed(text)
        parser.close()
        text = "".join(parser.parts)
        if not text.strip():
            raise FinloraError(f"{path}: the page has no visible text")
    return text


# ---- segmenting ----------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph, cut after . ! ? unless the word before is an abbreviation,
    an initial ("J. Smith": one capital letter) or dotted letters ("U.S.")."""
    sentences, start = [], 0
    for match in _END.finditer(text):
        before = text[start : match.start()].split()
        word = before[-1].strip("([{\"'\u201c\u2018").rstrip(".") if before else ""
        if (
            word.lower() in ABBREVIATIONS
            or (len(word) == 1 and word.isupper())  # not "m" in "EUR 3.1 m."
            or re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word)
        ):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def is_prose(text: str) -> bool:
    """Three words or more, and more letters than digits: not a table row, a date line or a
    page number."""
    letters = sum(c.isalpha() for c in text)
    digits = sum(c.isdigit() for c in text)
    return len(_WORD.findall(text)) >= 3 and letters > 2 * digits


def _tabular(line: str) -> bool:
    """A table row: a Markdown one, cells apart by tabs or wide spaces, or more digits than
    half its letters."""
    cells = line.strip()
    letters = sum(c.isalpha() for c in cells)
    digits = sum(c.isdigit() for c in cells)
    return cells.startswith("|") or "\t" in cells or "   " in cells or 2 * digits > letters


def _title_like(line: str) -> bool:
    """Up to 12 words with a letter, starting with a capital or digit, not ending like a
    sentence or a clause."""
    words = line.split()
    return (
        1 <= len(words) <= 12
        and (line[0].isupper() or line[0].isdigit())
        and not re.search(r"[.!?,;]$", line)
        and _WORD.search(line) is not None
    )


def _starts_new(line: str | None) -> bool:
    return line is None or line[:1].isupper() or line[:1].isdigit() or bool(_BULLET.match(line))


Paragraph = tuple[str, str]  # (kind: "heading", "table" or "prose"; text)


def _paragraphs(block: list[str]) -> list[Paragraph]:
    """A block's paragraphs. Markdown headings, table rows and bullet items stand alone; so does
    a short title-like line before a line that starts anew (PDF text layers keep headings on
    lines of their own, but not the blank lines around them). Other lines are line wraps and
    join the paragraph before them. A lone title-like line is a heading."""
    width = max(len(line) for line in block)
    out: list[tuple[str, list[str]]] = []
    joinable = False  # whether the next line may continue the last paragraph
    for i, raw in enumerate(block):
        line = raw.strip()
        markdown = _MARKDOWN_HEADING.match(line)
        bullet = _BULLET.match(line)
        if markdown:
            out.append(("heading", [markdown.group(1)]))
        elif _tabular(line):
            out.append(("table", [line]))
        elif (
            _title_like(line)
            and len(line) <= 0.6 * width
            and _starts_new(block[i + 1].strip() if i + 1 < len(block) else None)
        ):
            out.append(("heading", [line]))
        elif bullet or not joinable:
            out.append(("prose", [line[bullet.end() :] if bullet else line]))
        else:
            out[-1][1].append(line)
        joinable = out[-1][0] == "prose"
    paragraphs = []
    for kind, lines in out:
        text = " ".join(lines)
        if kind == "prose" and len(lines) == 1 and _title_like(text):
            kind = "heading"
        paragraphs.append((kind, text))
    return paragraphs


def segment(text: str) -> Segmented:
    """Cut a report's text into sentences, each with the heading above it.

    Blocks are separated by blank lines, and cut into paragraphs (`_paragraphs`); hyphenated
    line breaks are joined. Table rows and fragments that are not prose (`is_prose`) are
    counted, not kept.
    """
    text = _HYPHEN_BREAK.sub(r"\1", text.replace("\r\n", "\n").replace("\r", "\n"))
    section, skipped = "", 0
    sentences: list[Sentence] = []
    for raw in re.split(r"\n\s*\n", text):
        lines = [line for line in raw.split("\n") if line.strip()]
        if not lines:
            continue
        for kind, paragraph in _paragraphs(lines):
            if kind == "heading":
                section = paragraph.strip()
                continue
            if kind == "table":
                skipped += 1
                continue
            for sentence in split_sentences(re.sub(r"\s+", " ", paragraph)):
                if is_prose(sentence):
                    sentences.append(Sentence(len(sentences), section, sentence))
                else:
                    skipped += 1
    return Segmented(sentences, skipped)


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

    @property
    def predicted(self) -> list[str]:
        return [self.labels[int(i)] for i in self.probs.argmax(axis=1)]

    def tone(self, rows: Sequence[int] | None = None) -> float | None:
        """Mean P(positive) - P(negative) over the rows (all by default), for runs whose
        labels include both; None otherwise."""
        columns = _tone_columns(self.labels)
        if columns is None:
            return None
        probs = self.probs if rows is None else self.probs[list(rows)]
        return float((probs[:, columns[0]] - probs[:, columns[1]]).mean())

    def sections(self) -> list[dict[str, Any]]:
        """Consecutive runs of sentences under one heading, in document order."""
        runs: list[tuple[str, list[int]]] = []
        for s in self.sentences:
            if not runs or runs[-1][0] != s.section:
                runs.append((s.section, []))
            runs[-1][1].append(s.index)
        predicted = self.predicted
        out = []
        for title, rows in runs:
            counts = {label: sum(predicted[i] == label for i in rows) for label in self.labels}
            out.append({
                "title": title or "(before the first heading)",
                "first_sentence": rows[0],
                "sentences": len(rows),
                "tone": self.tone(rows),
                "shares": {label: counts[label] / len(rows) for label in self.labels},
            })  # fmt: skip
        return out

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
        predicted = self.predicted
        n = len(self.sentences)
        return {
            "source": self.source,
            "sentences": n,
            "skipped_fragments": self.skipped,
            "labels": {
                label: {
                    "sentences": predicted.count(label),
                    "share": predicted.count(label) / n,
                    "mean_probability": float(self.probs[:, j].mean()),
                }
                for j, label in enumerate(self.labels)
            },
            "tone": self.tone(),
            "sections": self.sections(),
            "top": {label: self.top(label, top) for label in self.labels},
        }

    def sentences_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["index", "section", "label", *[f"p_{x}" for x in self.labels], "text"])
        for s, label, row in zip(self.sentences, self.predicted, self.probs, strict=True):
            writer.writerow([s.index, s.section, label, *[round(float(p), 6) for p in row], s.text])
        return buffer.getvalue()


def analyze(
    text: str, source: str, labels: Sequence[str], score: Callable[[list[str]], np.ndarray]
) -> ReportAnalysis:
    """Segment a report's text (`read_report`) and score its sentences with `score`, which
    gives (N, K) probabilities in `labels` order (a classification run's `proba`); `source`
    names the report in the summary.

    Raises FinloraError when the text holds no prose sentence.
    """
    parts = segment(text)
    if not parts.sentences:
        raise FinloraError(
            f"{source}: no prose sentence found ({parts.skipped} table rows or fragments)"
        )
    probs = np.asarray(score([s.text for s in parts.sentences]), dtype=float)
    return ReportAnalysis(source, list(labels), parts.sentences, probs, parts.skipped)


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
        stem = re.sub(r"[^\w.-]+", "_", Path(source).stem) or "report"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def comparison(analyses: Sequence[ReportAnalysis]) -> list[dict[str, Any]]:
    """One row per report: sentences, label shares and tone, in the order given."""
    rows = []
    for a in analyses:
        predicted = a.predicted
        rows.append({
            "report": a.source,
            "sentences": len(a.sentences),
            "shares": {label: predicted.count(label) / len(predicted) for label in a.labels},
            "tone": a.tone(),
        })  # fmt: skip
    return rows


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
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["report", "folder", "sentences", *[f"share_{x}" for x in labels], "tone"])
        for row, name in zip(rows, names, strict=True):
            shares = [round(row["shares"][x], 6) for x in labels]
            tone = "" if row["tone"] is None else round(row["tone"], 6)
            writer.writerow([row["report"], name, row["sentences"], *shares, tone])
        atomic.write_text(tmp / COMPARISON_FILE, buffer.getvalue())
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
