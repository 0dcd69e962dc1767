"""Report analysis without a model: reading documents (text, HTML, PDF), cutting them into
sections and sentences, and the summary of given probabilities."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from finlora.data.documents import (
    Segmented,
    Sentence,
    read_report,
    read_report_stream,
    segment,
    split_sentences,
)
from finlora.errors import FinloraError
from finlora.plots import plot_report_comparison, plot_report_profile
from finlora.report import ReportAnalysis, _directory_names, comparison, format_comparison

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


def _page(tmp_path: Path, html: str) -> Segmented:
    """An .html report of `html`, read and cut."""
    page = tmp_path / "release.html"
    page.write_text(html, encoding="utf-8")
    return segment(read_report(page))


def test_html_reports_read_their_visible_text(tmp_path: Path) -> None:
    parts = _page(
        tmp_path,
        "<html><head><title>ignored</title><style>p {color: red}</style></head><body>"
        "<h2>Outlook</h2><p>Net sales are expected to grow.\nMargins &amp; volumes\nimprove."
        "</p><script>var x = 'Not text.';</script><table><tr><td>Net sales</td><td>3,100</td>"
        "</tr></table><h2>Risks</h2><p>Demand may weaken.</p></body></html>",
    )
    assert [(s.section, s.text) for s in parts.sentences] == [
        ("Outlook", "Net sales are expected to grow."),
        ("Outlook", "Margins & volumes improve."),
        ("Risks", "Demand may weaken."),
    ]


def _pdf(*pages: list[str]) -> bytes:
    """A PDF whose pages' text layers hold `pages` (Helvetica, one line each)."""
    n = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    font = 3 + 2 * n
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {n} >>"]
    for i, lines in enumerate(pages):
        shown = " ".join(f"({line}) Tj 0 -16 Td" for line in lines)
        stream = f"BT /F1 12 Tf 72 720 Td {shown} ET"
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
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
        ("cut.pdf", _pdf(["Net sales rose."])[:300], "not a readable PDF"),
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
        assert row["share"] == pytest.approx((predicted == j).mean(), abs=1e-6)
        assert row["mean_probability"] == pytest.approx(probs[:, j].mean(), abs=1e-6)
    assert summary["tone"] == pytest.approx((probs[:, 2] - probs[:, 0]).mean(), abs=1e-6)
    first, _, last = summary["sections"]
    assert (first["title"], first["first_sentence"], first["sentences"]) == ("Highlights", 0, 4)
    assert (last["title"], last["first_sentence"], last["sentences"]) == ("Risk factors", 7, 3)
    assert last["tone"] == pytest.approx((probs[7:, 2] - probs[7:, 0]).mean(), abs=1e-6)
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


def test_pdf_page_furniture_goes_and_sentences_run_over_pages(tmp_path: Path) -> None:
    header = "Example Oyj Annual Report 2024"
    report = tmp_path / "annual.pdf"
    report.write_bytes(_pdf(
        [header, "Financial review", "Net sales rose 12 % to EUR 450 million, and the", "1"],
        [header, "margin improved in all of our markets.", "Demand may weaken next year.", "2"],
        [header, "Costs rose sharply in the fourth quarter.", "3"],
    ))  # fmt: skip
    parts = segment(read_report(report))
    assert [(s.section, s.text) for s in parts.sentences] == [
        ("Financial review", "Net sales rose 12 % to EUR 450 million, and the margin improved "
                             "in all of our markets."),
        ("Financial review", "Demand may weaken next year."),
        ("Financial review", "Costs rose sharply in the fourth quarter."),
    ]  # fmt: skip


@pytest.mark.parametrize(("password", "readable"), [("", True), ("secret", False)])
def test_encrypted_pdfs_open_with_an_empty_password_only(
    tmp_path: Path, password: str, readable: bool
) -> None:
    from pypdf import PdfReader, PdfWriter

    plain = tmp_path / "plain.pdf"
    plain.write_bytes(_pdf(["Net sales rose 12 % to EUR 3.1 mn."]))
    writer = PdfWriter(clone_from=PdfReader(plain))
    writer.encrypt(user_password=password, owner_password="owner", algorithm="AES-256")
    locked = tmp_path / "locked.pdf"
    with locked.open("wb") as fh:
        writer.write(fh)
    if readable:  # permissions-only encryption, common in published reports
        assert [s.text for s in segment(read_report(locked)).sentences] == [
            "Net sales rose 12 % to EUR 3.1 mn."
        ]
    else:
        with pytest.raises(FinloraError, match="encrypted; save a decrypted copy"):
            read_report(locked)


def test_bullets_headings_and_wrapped_figures() -> None:
    text = (
        "Highlights\n"
        "- Net sales increased by 12 percent\n"
        "- Operating profit fell sharply in Europe\n\n"
        "Outlook\n=======\n\n"
        "Net sales rose to EUR 112.4 m\n"
        "in 2024 from EUR 105.3 m in 2023,\n"
        "while operating profit improved.  Demand   held. Profit fell.\n\n"
        "**Risks**\n\n"
        "Personnel   1,204   1,180\n"
        "Costs may rise."
    )
    assert [(s.section, s.text) for s in segment(text).sentences] == [
        ("Highlights", "Net sales increased by 12 percent"),  # a bullet is never a heading
        ("Highlights", "Operating profit fell sharply in Europe"),
        ("Outlook", "Net sales rose to EUR 112.4 m in 2024 from EUR 105.3 m in 2023, while "
                    "operating profit improved."),
        ("Outlook", "Demand held."),
        ("Outlook", "Profit fell."),  # two words, but a sentence
        ("Risks", "Costs may rise."),
    ]  # fmt: skip


def test_html_without_head_end_and_with_tables(tmp_path: Path) -> None:
    parts = _page(
        tmp_path,
        "<html><head><title>Release</title><body><h1>Results</h1>"
        "<table><tr><td>Operating profit before tax and amortization</td><td>12</td></tr>"
        "<tr><td><p>Net sales rose in all regions.</p></td></tr></table></body></html>",
    )
    # The two-cell row is a table row; the one-cell row is layout around prose.
    assert [(s.section, s.text) for s in parts.sentences] == [
        ("Results", "Net sales rose in all regions.")
    ]
    assert parts.skipped == 1


def test_standard_input_is_decoded_as_files_are() -> None:
    latin1 = "# Résultats\n\nNet sales in München rose by 12 %.\n".encode("latin-1")
    stream = io.TextIOWrapper(io.BytesIO(latin1))
    text = read_report_stream(stream)
    assert segment(text).sentences[0] == Sentence(
        0, "Résultats", "Net sales in München rose by 12 %."
    )
    html = io.TextIOWrapper(io.BytesIO(b"<html><body><p>Net sales rose sharply.</p></body></html>"))
    assert segment(read_report_stream(html)).sentences[0].text == "Net sales rose sharply."


def test_report_folder_names_are_safe_and_distinct() -> None:
    assert _directory_names(["a/q3.md", "b/q3.pdf", "..txt", ".", "standard input"]) == [
        "q3", "q3-2", "report", "report-2", "standard_input"
    ]  # fmt: skip


def test_bold_sentences_rules_and_wrapped_bullets_stay_prose() -> None:
    text = (
        "**Highlights**\n\n"
        "**Net sales rose 12 %.**\n"
        "Costs rose in\n"
        "Europe, and margins fell.\n"
        "---\n"
        "- Order intake grew in\n"
        "  Europe and Asia\n"
        "- Demand held.\n"
    )
    assert [(s.section, s.text) for s in segment(text).sentences] == [
        ("Highlights", "Net sales rose 12 %."),
        ("Highlights", "Costs rose in Europe, and margins fell."),
        ("Highlights", "Order intake grew in Europe and Asia"),
        ("Highlights", "Demand held."),
    ]


def test_pdf_headings_and_sentences_that_repeat_are_not_furniture(tmp_path: Path) -> None:
    report = tmp_path / "notes.pdf"
    report.write_bytes(_pdf(
        ["Note 1", "Our strategy delivers growth.", "Net sales rose in Europe."],
        ["Note 2", "Our strategy delivers growth.", "Costs rose sharply in Asia."],
    ))  # fmt: skip
    assert [(s.section, s.text) for s in segment(read_report(report)).sentences] == [
        ("Note 1", "Our strategy delivers growth."),
        ("Note 1", "Net sales rose in Europe."),
        ("Note 2", "Our strategy delivers growth."),
        ("Note 2", "Costs rose sharply in Asia."),
    ]


def test_html_prose_in_layout_tables_and_pages_after_comments(tmp_path: Path) -> None:
    parts = _page(
        tmp_path,
        "<!-- generated --><table><tr><td><h2>Outlook</h2><p>Net sales will grow.</p>"
        "<p>Margins will improve further.</p></td></tr><tr><td></td><td>Demand in Europe "
        "weakened in the fourth quarter of the year.</td></tr><tr><td>EBIT</td><td>12.1</td>"
        "</tr></table>",
    )
    assert [(s.section, s.text) for s in parts.sentences] == [
        ("Outlook", "Net sales will grow."),
        ("Outlook", "Margins will improve further."),
        ("Outlook", "Demand in Europe weakened in the fourth quarter of the year."),
    ]
    assert parts.skipped == 1  # the EBIT row
    stream = io.TextIOWrapper(io.BytesIO(b"<?xml version='1.0'?><h2>Risks</h2><p>Costs rose.</p>"))
    assert segment(read_report_stream(stream)).sentences == [Sentence(0, "Risks", "Costs rose.")]


def test_words_hyphenated_over_line_breaks() -> None:
    text = (
        "The finan-\ncial position of the company im-\nproved markedly this year.\n"
        "Long-\nterm debt fell and a one-\noff charge was booked for the year.\n"
        "The cost-\ncutting programme, unlike earlier costcutting, ran to plan.\n"
        "Our self-\nfunded growth and cost-cutting-\nfree model both held up.\n"
    )
    assert [s.text for s in segment(text).sentences] == [
        # A word broken in two is joined; a compound head keeps its hyphen.
        "The financial position of the company improved markedly this year.",
        "Long-term debt fell and a one-off charge was booked for the year.",
        # The report decides where it writes the word elsewhere.
        "The costcutting programme, unlike earlier costcutting, ran to plan.",
        "Our self-funded growth and cost-cutting-free model both held up.",
    ]


def test_text_all_in_lower_case_is_cut_into_sentences() -> None:
    text = "sales rose 5 % in q3. margins improved, e.g. in retail. profit fell approx. 3 %.\n"
    assert [s.text for s in segment(text).sentences] == [
        "sales rose 5 % in q3.",
        "margins improved, e.g. in retail.",
        "profit fell approx. 3 %.",
    ]
    # With capitals about, a lower-case word after a stop goes on the same sentence.
    assert split_sentences("Sales were EUR 3.1 mn. in the quarter. Profit rose.") == [
        "Sales were EUR 3.1 mn. in the quarter.",
        "Profit rose.",
    ]
