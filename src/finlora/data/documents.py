"""Financial documents as text, cut into sections and sentences.

Annual reports, earnings releases and filings are long prose broken by headings, bullet lists,
tables and page furniture. `read_report` turns one into text (plain text, Markdown, HTML or a
PDF with a text layer); `segment` cuts the text into sections at its headings and into
sentences (not at "Mr.", "Inc.", "U.S." or initials), and sets aside what is not prose (table
rows, page numbers). `finlora.report` scores the sentences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

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
