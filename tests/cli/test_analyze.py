"""`finlora analyze`: a report read sentence by sentence with a trained run."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Result, assert_user_error

from finlora.data.documents import segment

REPORT = """# Interim report

## Highlights

Net sales rose 12 % to EUR 3.1 mn. Operating profit was EUR 0.4 mn, compared with a loss.

| EUR mn | 2024 | 2023 |
| Net sales | 3.1 | 2.8 |

## Risks

Demand may weaken in Europe. The company recorded an impairment of EUR 4.2 mn.
"""


@pytest.fixture
def report(tmp_path: Path) -> Path:
    path = tmp_path / "q3.md"
    path.write_text(REPORT, encoding="utf-8")
    return path


def test_analysis_files_summary_and_predict_agree(
    cli: Callable[..., Result], trained: Path, report: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q3-analysis"
    result = cli("analyze", trained, report, "--out", out, "--json", "--top", "1")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary == json.loads((out / "summary.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["profile.png", "sentences.csv", "summary.json"]
    assert (out / "profile.png").read_bytes().startswith(b"\x89PNG")
    texts = [s.text for s in segment(REPORT).sentences]
    assert summary["sentences"] == len(texts) == 4 and summary["skipped_fragments"] == 2
    assert [s["title"] for s in summary["sections"]] == ["Highlights", "Risks"]
    # Each sentence scored as `finlora predict` scores it.
    rows = list(csv.DictReader((out / "sentences.csv").open(encoding="utf-8")))
    predicted = [
        json.loads(line) for line in cli("predict", trained, "--json", *texts).out.splitlines()
    ]
    assert [r["text"] for r in rows] == texts
    for row, p in zip(rows, predicted, strict=True):
        assert row["label"] == p["label"]
        for label, prob in p["probabilities"].items():
            assert float(row[f"p_{label}"]) == pytest.approx(prob, abs=1e-5)
    for label, top in summary["top"].items():
        assert len(top) == min(1, summary["labels"][label]["sentences"])


def test_text_summary_and_standard_input(cli: Callable[..., Result], trained: Path) -> None:
    result = cli("analyze", trained, "-", stdin=REPORT)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "standard input: 4 sentences scored (2 table rows and fragments skipped)"
    assert lines[2].split() == ["label", "sentences", "share", "mean", "p"]
    assert any(line.startswith("tone (mean P(positive) - P(negative)): ") for line in lines)
    assert "sections (tone):" in lines


@pytest.mark.parametrize(
    ("text", "message"),
    [("12\n\n| 1 | 2 |\n", "no prose sentence found (2 table rows or fragments)"),
     (None, "no such file")],
)  # fmt: skip
def test_reports_without_sentences_are_refused_in_one_line(
    cli: Callable[..., Result], trained: Path, tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "report.txt"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert_user_error(cli("analyze", trained, path), message)


def test_existing_output_is_refused_before_the_model_loads(
    cli: Callable[..., Result], trained: Path, report: Path, tmp_path: Path
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    assert_user_error(cli("analyze", trained, report, "--out", out), "use --overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli("analyze", trained, report, "--out", out, "--overwrite").code == 0
    assert sorted(p.name for p in out.iterdir()) == ["profile.png", "sentences.csv", "summary.json"]


NEGATIVE = """## Results

Net sales fell 6 % and the operating loss widened. The company lowers its guidance.
"""


def test_several_reports_side_by_side(
    cli: Callable[..., Result], trained: Path, report: Path, tmp_path: Path
) -> None:
    second = tmp_path / "other" / "q3.txt"  # the same stem as the first: folders q3, q3-2
    second.parent.mkdir()
    second.write_text(NEGATIVE, encoding="utf-8")
    out = tmp_path / "quarters"
    result = cli("analyze", trained, report, second, "--out", out, "--json")
    assert result.code == 0, result.err
    summaries = json.loads(result.out)["reports"]
    alone = [json.loads(cli("analyze", trained, r, "--json").out) for r in (report, second)]
    assert [s["source"] for s in summaries] == [str(report), str(second)]
    for together, single in zip(summaries, alone, strict=True):
        assert together["sentences"] == single["sentences"]
        assert together["tone"] == pytest.approx(single["tone"], abs=1e-6)
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.csv",
        "comparison.png",
        "q3",
        "q3-2",
    ]
    assert json.loads((out / "q3-2" / "summary.json").read_text()) == summaries[1]
    rows = list(csv.DictReader((out / "comparison.csv").open(encoding="utf-8")))
    assert [(r["folder"], int(r["sentences"])) for r in rows] == [("q3", 4), ("q3-2", 2)]
    assert float(rows[1]["tone"]) == pytest.approx(summaries[1]["tone"], abs=1e-5)
    table = cli("analyze", trained, report, second).out.splitlines()
    assert table[0].split() == ["report", "sentences", "negative", "neutral", "positive", "tone"]
    assert [line.split()[1] for line in table[1:]] == ["4", "2"]
    assert table[1].split()[0].endswith("/q3.md") and table[2].split()[0].endswith("/q3.txt")


def test_several_reports_are_all_read_before_the_model_loads(
    cli: Callable[..., Result], trained: Path, report: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pdf"
    assert_user_error(cli("analyze", trained, report, missing), f"{missing}: no such file")
    assert_user_error(cli("analyze", trained, "-", "-", stdin=REPORT), "read once")


def test_predict_points_a_report_to_analyze(
    cli: Callable[..., Result], trained: Path, tmp_path: Path
) -> None:
    report = tmp_path / "annual.pdf"
    report.write_bytes(b"%PDF-1.4 ...")
    assert_user_error(cli("predict", trained, "--file", report), "finlora analyze RUN REPORT")


def test_bad_outputs_and_damaged_pdfs_are_one_line(
    cli: Callable[..., Result], trained: Path, report: Path, tmp_path: Path
) -> None:
    assert_user_error(cli("analyze", trained, report, "--out", report / "sub"),
                      f"{report}: exists and is not a directory")  # fmt: skip
    assert_user_error(cli("analyze", trained, report, "--out", "."), "a name of its own")
    damaged = tmp_path / "damaged.pdf"  # pypdf logs its repair attempts: none may show
    damaged.write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n")
    assert_user_error(cli("analyze", trained, damaged), "not a readable PDF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "damaged.pdf", "q3.md"]


@pytest.mark.parametrize(
    ("args", "message"),
    [(("analyze", "RUN", "r.md", "--top", "x"),
      "Invalid value for '--top': 'x' is not a valid integer. (see finlora analyze --help)"),
     (("bogus",), "No such command 'bogus'. (see finlora --help)"),
     (("analyze", "RUN"), "Missing argument 'REPORTS...'. (see finlora analyze --help)")],
)  # fmt: skip
def test_usage_mistakes_are_one_line(
    cli: Callable[..., Result], args: tuple[str, ...], message: str
) -> None:
    assert_user_error(cli(*args), message)
