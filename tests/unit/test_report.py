"""Report analysis without a model: reading documents (text, HTML, PDF), cutting them into
sections and sentences, and the summary of given probabilities."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from finlora.data.documents import read_report, segment, split_sentences
from finlora.errors import FinloraError
from finlora.plots import plot_report_comparison, plot_report_profile
from finlora.report import ReportAnalysis, comparison, format_comparison

REPORT = """ANNUAL REPORT 2024

# Highlights

Net sales rose 12 % to EUR 3.1 mn. Operating profit was EUR 0.4 mn, compared with a loss a
year ago. Mr. J. Smith, CEO of Acme Inc., said the U.S. market grew.
The board proposes a dividend (approx. 40 % of earnings).

Key figures
Net sales 3,100 2,768 12.0 %
Personnel at the end of the period    1,204    1,180
| Order intake | strong | weak |

- Order intake increased by 8 %.
- The company hired 45 new em-
ployees in Finland.
1. Cash flow was negative due to investments.

Risk factors

The war in Ukraine may weaken demand. See Fig. 3 for details! "Prices rose sharply," he said.

12
"""


def test_sentences_end_at_stops_but_not_abbreviations_initials_or_numbers() -> None:
    assert split_sentences(
        "Sales fell to EUR 3.1 mn. Mr. Smith of Acme Inc. said so. Prices rose (approx. 5 %). "
        'The U.S. unit grew! "Margins held," J. Doe said. Is it 2.5? Yes. It fell to EUR 3 m. '
        "Costs rose."
    ) == [
        "Sales fell to EUR 3.1 mn.",
        "Mr. Smith of Acme Inc. said so.",
        "Prices rose (approx. 5 %).",
        "The U.S. unit grew!",
        '"Margins held," J. Doe said.',
        "Is it 2.5?",
        "Yes.",
        "It fell to EUR 3 m.",
        "Costs rose.",
    ]  # fmt: skip
    # A new sentence may open with a dash, a bracket or quotes before its capital.
    opened = split_sentences("Sales rose. - Profit fell. ( ADP ) Costs held. `` Demand grew.")
    assert opened == ["Sales rose.", "- Profit fell.", "( ADP ) Costs held.", "`` Demand grew."]
    # No capital after the stop, no cut: "e.g. our" and a lower-case continuation.
    assert split_sentences("Costs, e.g. energy, rose. and more") == [
        "Costs, e.g. energy, rose. and more"
    ]


def test_segment_finds_sections_sentences_and_skips_tables() -> None:
    parts = segment(REPORT)
    assert [(s.section, s.text) for s in parts.sentences] == [
        ("Highlights", "Net sales rose 12 % to EUR 3.1 mn."),
        ("Highlights", "Operating profit was EUR 0.4 mn, compared with a loss a year ago."),
        ("Highlights", "Mr. J. Smith, CEO of Acme Inc., said the U.S. market grew."),
        ("Highlights", "The board proposes a dividend (approx. 40 % of earnings)."),
        ("Key figures", "Order intake increased by 8 %."),
        ("Key figures", "The company hired 45 new employees in Finland."),
        ("Key figures", "Cash flow was negative due to investments."),
        ("Risk factors", "The war in Ukraine may weaken demand."),
        ("Risk factors", "See Fig. 3 for details!"),
        ("Risk factors", '"Prices rose sharply," he said.'),
    ]
    assert [s.index for s in parts.sentences] == list(range(10))
    # Three table rows and the page number "12".
    assert parts.skipped == 4


def test_headings_on_lines_of_their_own_without_blank_lines() -> None:
    """As a PDF's text layer gives a page: headings are short lines before a new start."""
    page = (
        "Nordic Widgets Oyj interim report\n"
        "Highlights\n"
        "Net sales increased by 14 % to EUR 212.4 million. Operating profit rose to EUR\n"
        "18.9 million from EUR 11.2 million a year earlier, and order intake grew in\n"
        "Europe and Asia.\n"
        "Net sales 71.2 62.0 14.8\n"
        "Risks and uncertainties\n"
        "Demand may weaken in Europe.\n"
    )
    parts = segment(page)
    assert [(s.section, s.text) for s in parts.sentences] == [
        ("Highlights", "Net sales increased by 14 % to EUR 212.4 million."),
        ("Highlights", "Operating profit rose to EUR 18.9 million from EUR 11.2 million a year "
                       "earlier, and order intake grew in Europe and Asia."),
        ("Risks and uncertainties", "Demand may weaken in Europe."),
    ]  # fmt: skip
    assert parts.skipped == 1


def test_html_reports_read_their_visible_text(tmp_path: Path) -> None:
    page = tmp_path / "release.html"
    page.write_text(
        "<html><head><title>ignored</title><style>p {color: red}</style></head><body>"
        "<h2>Outlook</h2><p>Net sales are expected to grow.\nMargins &amp; volumes\nimprove."
        "</p><script>var x = 'Not text.';</script><table><tr><td>Net sales</td><td>3,100</td>"
        "</tr></table><h2>Risks</h2><p>Demand may weaken.</p></body></html>",
        encoding="utf-8",
    )
    parts = segment(read_report(page))
    assert [(s.section, s.text) for s in parts.sentences] == [
        ("Outlook", "Net sales are expected to grow."),
        ("Outlook", "Margins & volumes improve."),
        ("Risks", "Demand may weaken."),
    ]


def _pdf(lines: list[str]) -> bytes:
    """A one-page PDF whose text layer holds `lines` (Helvetica, one line each)."""
    shown = " ".join(f"({line}) Tj 0 -16 Td" for line in lines)
    stream = f"BT /F1 12 Tf 72 720 Td {shown} ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    trailer = f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out + trailer.encode()


def test_pdf_reports_read_their_text_layer(tmp_path: Path) -> None:
    report = tmp_path / "report.pdf"
    report.write_bytes(_pdf(["Net sales rose 12 % to EUR 3.1 mn.", "Demand may weaken."]))
    parts = segment(read_report(report))
    assert [s.text for s in parts.sentences] == [
        "Net sales rose 12 % to EUR 3.1 mn.",
        "Demand may weaken.",
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("scan.pdf", _pdf([]), "no text layer"),
        ("broken.pdf", b"%PDF-1.4\nnot really a pdf", "not a readable PDF"),
        ("missing.pdf", None, "no such file"),
        ("empty.txt", b"  \n", "file is empty"),
        ("binary.txt", b"\x00\x01\x02 report", "undecodable bytes"),
        ("blank.html", b"<html><script>x()</script></html>", "no visible text"),
    ],
)
def test_unreadable_reports_are_refused_in_one_line(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FinloraError, match=message) as err:
        read_report(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def _analysis(labels: list[str]) -> ReportAnalysis:
    parts = segment(REPORT)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(labels)), size=len(parts.sentences))
    return ReportAnalysis("r.md", labels, parts.sentences, probs, parts.skipped)


def test_summary_counts_shares_tone_sections_and_top_sentences() -> None:
    analysis = _analysis(["negative", "neutral", "positive"])
    probs, predicted = analysis.probs, analysis.probs.argmax(axis=1)
    summary = analysis.summary(top=2)
    assert summary["sentences"] == 10 and summary["skipped_fragments"] == 4
    for j, label in enumerate(analysis.labels):
        row = summary["labels"][label]
        assert row["sentences"] == int((predicted == j).sum())
        assert row["share"] == pytest.approx((predicted == j).mean())
        assert row["mean_probability"] == pytest.approx(probs[:, j].mean())
    assert summary["tone"] == pytest.approx((probs[:, 2] - probs[:, 0]).mean())
    first, _, last = summary["sections"]
    assert (first["title"], first["first_sentence"], first["sentences"]) == ("Highlights", 0, 4)
    assert (last["title"], last["first_sentence"], last["sentences"]) == ("Risk factors", 7, 3)
    assert last["tone"] == pytest.approx((probs[7:, 2] - probs[7:, 0]).mean())
    assert sum(first["shares"].values()) == pytest.approx(1.0)
    for j, label in enumerate(analysis.labels):
        top = summary["top"][label]
        mine = sorted(np.flatnonzero(predicted == j), key=lambda i: -probs[i, j])[:2]
        assert [r["index"] for r in top] == [int(i) for i in mine]
    rows = list(csv.reader(io.StringIO(analysis.sentences_csv())))
    assert rows[0] == ["index", "section", "label", "p_negative", "p_neutral", "p_positive", "text"]
    assert rows[3][1:3] == ["Highlights", analysis.labels[predicted[2]]]
    assert rows[3][-1] == "Mr. J. Smith, CEO of Acme Inc., said the U.S. market grew."


def test_labels_without_positive_and_negative_have_no_tone(tmp_path: Path) -> None:
    analysis = _analysis(["bullish", "bearish"])
    summary = analysis.summary()
    assert summary["tone"] is None and summary["sections"][0]["tone"] is None
    path = plot_report_profile(
        analysis.probs, analysis.labels, summary["sections"], tmp_path / "p.png"
    )
    assert path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(FinloraError, match="no scored sentence"):
        plot_report_profile(np.zeros((0, 2)), analysis.labels, [], tmp_path / "q.png")
    rows = comparison([analysis, analysis])
    assert [r["tone"] for r in rows] == [None, None]
    assert format_comparison(rows).splitlines()[0].split() == ["report", "sentences", "bullish",
                                                               "bearish"]  # fmt: skip
    assert plot_report_comparison(rows, analysis.labels, tmp_path / "c.png").is_file()
    with pytest.raises(FinloraError, match="no report"):
        plot_report_comparison([], analysis.labels, tmp_path / "d.png")
