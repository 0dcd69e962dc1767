"""Financial documents as text, cut into sections and sentences.

Annual reports, earnings releases and filings are long prose broken by headings, bullet lists,
tables and page furniture. `read_report` turns one into text (plain text, Markdown, HTML or a
PDF with a text layer); `segment` cuts the text into sections at its headings and into
sentences (not at "Mr.", "Inc.", "U.S." or initials), and sets aside what is not prose (table
rows, page numbers). `finlora.report` scores the sentences.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from finlora.data.textfile import STDIN, read_stream, read_text
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
# Text written all in lower case (chat logs, transcripts) has no capitals to start sentences:
# there a stop before white space and any letter or digit ends one.
_END_LOWER = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'`\u201c\u2018(\[]{0,2}[a-z0-9])")
_MARKDOWN_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_WORD = re.compile(r"[^\W\d_]{2,}")  # a word of two letters or more
_HYPHEN_BREAK = re.compile(r"((?:\w+-)*\w+)-\n([a-z]\w*)")
# Words that head compounds in financial prose ("long-term", "non-recurring", "year-end"): a
# line break after their hyphen keeps it, where a break inside a word ("finan-cial") does not.
# fmt: off
_COMPOUND_HEADS = frozenset({
    "long", "short", "medium", "mid", "near", "year", "quarter", "half", "full", "non", "pre",
    "post", "self", "cross", "multi", "well", "one", "two", "three", "low", "high", "fixed",
    "floating", "single", "double", "risk", "market", "cash", "tax", "like", "all", "re", "co",
})
# fmt: on


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
    """The visible text of an HTML page, with block elements on lines of their own, headings
    marked as Markdown headings, and table rows of short cells (figures, labels) as Markdown
    table rows, which the segmenter sets aside. Rows that hold prose, as layout tables do,
    keep each cell as paragraphs of its own."""

    # fmt: off
    BLOCKS = frozenset({"p", "div", "br", "li", "table", "section", "article", "header",
                        "footer", "ul", "ol", "dd", "dt"})
    # fmt: on
    HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
    HIDDEN = frozenset({"script", "style", "head", "template", "noscript"})
    CELL_WORDS = 8  # a cell of more words is prose, not a table entry

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0
        self._rows: list[tuple[int, list[int]]] = []  # open rows: (first part, cell starts)

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "body":
            self._hidden = 0  # a <head> left open ends here
        elif tag in self.HIDDEN:
            self._hidden += 1
        elif tag in self.HEADINGS:
            self.parts.append("\n\n# ")
        elif tag == "tr":
            self._rows.append((len(self.parts), []))
        elif tag in ("td", "th") and self._rows:
            self._rows[-1][1].append(len(self.parts))
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag == "p" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self.HEADINGS or tag == "p" or tag in ("td", "th"):
            self.parts.append("\n\n")
        elif tag == "tr" and self._rows:
            start, cell_starts = self._rows.pop()
            bounds = [*cell_starts, len(self.parts)]
            pieces = ("".join(self.parts[a:b]) for a, b in itertools.pairwise(bounds))
            cells = [" ".join(p.split()) for p in pieces if p.strip()]
            if len(cells) > 1 and all(len(c.split()) <= self.CELL_WORDS for c in cells):
                del self.parts[start:]
                self.parts.append("\n| " + " | ".join(cells) + " |\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            # Inside a heading or paragraph, source line breaks are only layout.
            self.parts.append(re.sub(r"\s+", " ", data))


# Content that starts as HTML does: after comments or an XML declaration, a page's or a
# fragment's first tag.
_HTML_START = re.compile(
    r"\s*(<!--.*?-->\s*|<\?xml[^>]*>\s*)*<(!doctype\s+html|html|head|body|div|p|h[1-6]|table"
    r"|section|article|span|ul|ol|br|meta|title)\b",
    re.IGNORECASE | re.DOTALL,
)
HTML_SUFFIXES = (".html", ".htm", ".xhtml")


def _looks_like_html(text: str) -> bool:
    return _HTML_START.match(text[:4096]) is not None


def report_text(text: str, name: str, html: bool = False) -> str:
    """The text to segment from a report's content: an HTML page's visible text (`html`, or
    content that starts like a page), or else `text`.

    Raises FinloraError (starting with `name`) for a page with no visible text.
    """
    if not (html or _looks_like_html(text)):
        return text
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    visible = "".join(parser.parts)
    if not visible.strip():
        raise FinloraError(f"{name}: the page has no visible text")
    return visible


# A page number alone ("12", "Page 3", "3 / 40"), as page headers and footers hold them.
_PAGE_NUMBER = re.compile(r"(page\s*)?\d{1,4}(\s*(of|/)\s*\d{1,4})?", re.IGNORECASE)


def _running_key(line: str) -> str | None:
    """What a page header or footer line keeps from page to page: the line without a leading
    or trailing page number. None for lines that cannot be furniture: a sentence, or a single
    word once the number is gone ("Note 3" is a heading)."""
    if re.search(r"[.!?]$", line):
        return None
    key = re.sub(r"^\d{1,4}\s+|\s+\d{1,4}$", "", line)
    return key if len(key.split()) >= 2 else None


def _join_pages(pages: list[str]) -> str:
    """The pages' text as one, without running headers and footers (the same line at the top
    or the bottom of at least half the pages, page numbers aside) or page numbers, and with a
    sentence that runs on over a page break joined again."""
    seen: dict[str, int] = {}
    for page in pages:
        lines = [line.strip() for line in page.splitlines() if line.strip()]
        keys = {_running_key(line) for line in lines[:2] + lines[-2:]}
        for key in keys:
            if key is not None:
                seen[key] = seen.get(key, 0) + 1
    running = {key for key, n in seen.items() if n >= max(2, len(pages) / 2)}
    kept = []
    for page in pages:
        lines = page.splitlines()
        body = [i for i, line in enumerate(lines) if line.strip()]
        edge = set(body[:2] + body[-2:])
        kept.append("\n".join(
            line for i, line in enumerate(lines)
            if i not in edge or not (_running_key(line.strip()) in running
                                     or _PAGE_NUMBER.fullmatch(line.strip()))
        ))  # fmt: skip
    return "\n".join(kept)


def _pdf_text(path: Path) -> str:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    encrypted = f"{path}: the PDF is encrypted; save a decrypted copy first"
    # pypdf logs what it repairs in a damaged file: lines above the one-line error.
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise FinloraError(encrypted)
        pages = [page.extract_text() or "" for page in reader.pages]
    except FinloraError:
        raise
    except DependencyError:
        raise FinloraError(
            f"{path}: the PDF is AES-encrypted, which needs the 'cryptography' package to "
            "decrypt (pip install cryptography); or save a decrypted copy"
        ) from None
    except FileNotDecryptedError:
        raise FinloraError(encrypted) from None
    except Exception as err:  # a damaged file can fail anywhere inside the parser
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        raise FinloraError(f"{path}: not a readable PDF ({detail})") from None
    finally:
        logger.setLevel(level)
    text = _join_pages(pages)
    if not text.strip():
        raise FinloraError(
            f"{path}: the PDF has no text layer (scanned pages?); run OCR on it first"
        )
    return text


def read_report(path: Path) -> str:
    """The text of a report: .pdf (its text layer), HTML (.html/.htm, or a page in any file:
    its visible text), anything else as text (UTF-8 or Latin-1, as data files are read).

    Raises FinloraError for a missing, empty, binary or unreadable file, or a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise FinloraError(f"{path}: is a directory, expected a report file")
    if path.suffix.lower() == ".pdf":
        if not path.exists():
            raise FinloraError(f"{path}: no such file")
        return _pdf_text(path)
    return report_text(read_text(path), str(path), html=path.suffix.lower() in HTML_SUFFIXES)


def read_report_stream(stream: Any) -> str:
    """A report from standard input, decoded and read as `read_report` reads a file."""
    return report_text(read_stream(stream), STDIN)


# ---- segmenting ----------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph, cut after . ! ? unless the word before is an abbreviation,
    an initial ("J. Smith": one capital letter) or dotted letters ("U.S.")."""
    sentences, start = [], 0
    ends = _END_LOWER if text == text.lower() else _END
    for match in ends.finditer(text):
        # The word before the stop, read from a short window: slicing from the last cut would
        # make a long run of abbreviations cost the square of its length.
        before = text[max(start, match.start() - 40) : match.start()].split()
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
    """More letters than digits, and three words or more (two when it ends like a sentence:
    "Profit fell."): not a table row, a date line or a page number."""
    letters = sum(c.isalpha() for c in text)
    digits = sum(c.isdigit() for c in text)
    words = len(_WORD.findall(text))
    ends = re.search(r"[.!?][\"'\u201d\u2019)\]]*$", text) is not None
    return letters > 2 * digits and (words >= 3 or (words == 2 and ends))


def _tabular(line: str) -> bool:
    """A table row: a Markdown one, three cells or more apart by tabs or wide spaces, or more
    digits than half its letters and no punctuation at its end (a line of prose that is full
    of figures ends a clause or a sentence, or runs on)."""
    cells = line.strip()
    if cells.startswith("|") or len(re.split(r"\t|\s{3,}", cells)) >= 3:
        return True
    letters = sum(c.isalpha() for c in cells)
    digits = sum(c.isdigit() for c in cells)
    return 2 * digits > letters and not re.search(r"[.,;:!?]$", cells)


# Words a heading does not end with, but a line that runs on often does.
# fmt: off
_RUNS_ON = frozenset({"a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "for", "by",
                      "with", "from", "as", "than", "that", "which", "its", "their", "our"})
# fmt: on


def _title_like(line: str) -> bool:
    """Up to 12 words with a letter, starting with a capital or digit, not ending like a
    sentence or a clause, nor with a word that leaves it running on ("rose in")."""
    words = line.split()
    return (
        1 <= len(words) <= 12
        and (line[0].isupper() or line[0].isdigit())
        and not re.search(r"[.!?,;]$", line)
        and words[-1].lower() not in _RUNS_ON
        and _WORD.search(line) is not None
    )


def _starts_new(line: str | None) -> bool:
    return line is None or line[:1].isupper() or line[:1].isdigit() or bool(_BULLET.match(line))


_UNDERLINE = re.compile(r"\s*(={3,}|-{3,})\s*")  # a rule, or under a Markdown (setext) heading
_EMPHASIS_HEADING = re.compile(r"\s*(\*\*|__)([^*_].*?)\1\s*")  # **Risks** on its own line

Paragraph = tuple[str, str]  # (kind: "heading", "table", "bullet" or "prose"; text)


def _paragraphs(block: list[str]) -> list[Paragraph]:
    """A block's paragraphs. Headings (Markdown, underlined or bold), table rows and bullet
    items stand alone; so does a short title-like line before a line that starts anew (PDF
    text layers keep headings on lines of their own, but not the blank lines around them).
    Other lines are line wraps and join the paragraph before them. A lone title-like line is
    a heading; a bullet item never is."""
    width = max(len(line) for line in block)
    out: list[tuple[str, list[str]]] = []
    for i, raw in enumerate(block):
        line = raw.strip()
        after = block[i + 1].strip() if i + 1 < len(block) else None
        markdown = _MARKDOWN_HEADING.match(line)
        bold = _EMPHASIS_HEADING.fullmatch(line)
        bullet = _BULLET.match(line)
        unfinished = bool(out) and out[-1][0] in ("prose", "bullet")
        unfinished = unfinished and not re.search(r"[.!?:]$", out[-1][1][-1])
        if _UNDERLINE.fullmatch(line):
            continue  # a rule, or the underline of the heading above
        if markdown:
            out.append(("heading", [markdown.group(1)]))
        elif bold:  # a bold title is a heading; a bold sentence is prose, without the stars
            out.append(("heading" if _title_like(bold.group(2)) else "prose", [bold.group(2)]))
        elif (
            after is not None and _UNDERLINE.fullmatch(after)
            and _title_like(line) and not unfinished
        ):  # fmt: skip
            out.append(("heading", [line]))
        elif _tabular(line):
            out.append(("table", [line]))
        elif bullet:
            out.append(("bullet", [line[bullet.end() :]]))
        elif unfinished and out[-1][0] == "bullet" and raw[:2].isspace():
            out[-1][1].append(line)  # an indented line goes on with the bullet item
        elif _title_like(line) and len(line) <= 0.6 * width and _starts_new(after):
            out.append(("heading", [line]))
        elif not out or out[-1][0] not in ("prose", "bullet"):
            out.append(("prose", [line]))
        else:
            out[-1][1].append(line)  # a wrapped line
    paragraphs = []
    for kind, lines in out:
        text = " ".join(lines)
        if kind == "prose" and len(lines) == 1 and _title_like(text):
            kind = "heading"
        paragraphs.append((kind, text))
    return paragraphs


def _join_hyphen_breaks(text: str) -> str:
    """Join words hyphenated over a line break: "finan-\\ncial" is "financial" but "long-\\nterm"
    stays "long-term". The report itself decides where it can (the word written whole, or with
    its hyphen, elsewhere in it); otherwise a chain of hyphens or a compound head
    (`_COMPOUND_HEADS`) keeps the hyphen.
    """
    words = set(re.findall(r"\w+(?:-\w+)*", text.lower()))

    def join(match: re.Match[str]) -> str:
        left, right = match.group(1), match.group(2)
        whole, hyphened = (left + right).lower(), f"{left}-{right}".lower()
        if "-" in left or (hyphened in words and whole not in words):
            keep = True  # a hyphenated chain ("cost-cutting-free") or the report's own spelling
        elif whole in words:
            keep = False
        else:
            keep = left.lower() in _COMPOUND_HEADS
        return f"{left}-{right}" if keep else left + right

    return _HYPHEN_BREAK.sub(join, text)


def segment(text: str) -> Segmented:
    """Cut a report's text into sentences, each with the heading above it.

    Blocks are separated by blank lines, and cut into paragraphs (`_paragraphs`); hyphenated
    line breaks are joined (`_join_hyphen_breaks`). Table rows and fragments that are not prose
    (`is_prose`) are counted, not kept.
    """
    text = _join_hyphen_breaks(text.replace("\r\n", "\n").replace("\r", "\n"))
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
