"""A run remembers how its data reads: `finlora eval RUN --data F` and `finlora predict RUN
--file F` take the run's columns, label map and format unless told otherwise; predict's --out
keeps the input's columns and CSV dialect; small test sets get their accuracy's interval."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Result, assert_user_error

from finlora.config import load_config
from finlora.data import Example, synthetic_sentiment
from finlora.train import train

NAMES = {"negative": "Bearish", "positive": "Bullish", "neutral": "Neutral"}
CODES = {"Bearish": "0", "Bullish": "1", "Neutral": "2"}
TFNS_MAP = "0=Bearish,1=Bullish,2=Neutral"


def sheet_rows(n: int, seed: int) -> list[Example]:
    return [Example(e.text, NAMES[e.label]) for e in synthetic_sentiment(n, seed=seed)]


def write_sheet(path: Path, header: list[str], rows: list[list[object]], sep: str = ",") -> Path:
    """A CSV as Excel in a European locale saves it: ";" between cells, a UTF-8 BOM first."""
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=sep).writerows([header, *rows])
    bom = "\ufeff" if sep == ";" else ""
    path.write_text(bom + buffer.getvalue(), encoding="utf-8", newline="")
    return path


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> dict[str, Path]:
    """Two tiny runs on spreadsheets: "names" on Headline / Sentiment written Bullish,
    Bearish, Neutral (no label map); "codes" on a TFNS-style text,label CSV of 0/1/2 with a
    label map."""
    folder = tmp_path_factory.mktemp("sheet-runs")
    rows = sheet_rows(60, seed=3)
    names = write_sheet(
        folder / "names.csv",
        ["Id", "Headline", "Sentiment"],
        [[i, e.text, e.label] for i, e in enumerate(rows)],
        sep=";",
    )
    codes = write_sheet(
        folder / "codes.csv", ["text", "label"], [[e.text, CODES[e.label]] for e in rows]
    )
    made = {}
    for name, data in {
        "names": [f"data.path={names}", "data.text_column=Headline", "data.label_column=Sentiment"],
        "codes": [f"data.path={codes}", f"data.label_map={TFNS_MAP}"],
    }.items():
        cfg = load_config(None, [*tiny_overrides, *data, "train.max_steps=2"])
        made[name] = folder / name
        train(cfg, made[name], progress_bar=False, log=quiet)
    return made


@pytest.fixture(scope="module")
def other_rows() -> list[Example]:
    return sheet_rows(24, seed=8)


def eval_json(cli: Callable[..., Result], *args: object) -> dict:
    result = cli("eval", *args, "--json", "--no-progress")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_eval_reads_a_file_with_the_runs_columns(
    cli: Callable[..., Result], runs: dict[str, Path], tmp_path: Path, other_rows: list[Example]
) -> None:
    path = write_sheet(
        tmp_path / "more.csv",
        ["Headline", "Sentiment"],
        [[e.text, e.label] for e in other_rows],
        sep=";",
    )
    metrics = eval_json(cli, runs["names"], "--data", path)
    assert metrics["n"] == len(other_rows) and metrics["labels"] == [
        "Bearish",
        "Bullish",
        "Neutral",
    ]
    # the flags still win, and a column wrong only in case is named
    wrong = cli("eval", runs["names"], "--data", path, "--text-column", "headline")
    assert_user_error(wrong, f"{path}: no column 'headline'", "did you mean 'Headline'?")
    relabelled = write_sheet(
        tmp_path / "codes.csv", ["title", "y"], [[e.text, CODES[e.label]] for e in other_rows]
    )
    given = eval_json(
        cli, runs["names"], "--data", relabelled, "--text-column", "title", "--label-column",
        "y", "--label-map", TFNS_MAP,
    )  # fmt: skip
    assert {k: given[k] for k in ("n", "accuracy")} == {k: metrics[k] for k in ("n", "accuracy")}


def test_eval_takes_the_runs_label_map_and_its_names(
    cli: Callable[..., Result], runs: dict[str, Path], tmp_path: Path, other_rows: list[Example]
) -> None:
    codes = write_sheet(
        tmp_path / "tfns.csv", ["text", "label"], [[e.text, CODES[e.label]] for e in other_rows]
    )
    named = write_sheet(
        tmp_path / "named.csv", ["text", "label"], [[e.text, e.label] for e in other_rows]
    )
    by_code = eval_json(cli, runs["codes"], "--data", codes)
    assert by_code["labels"] == ["Bearish", "Bullish", "Neutral"]
    by_name = eval_json(cli, runs["codes"], "--data", named)  # already the run's label names
    assert (by_name["n"], by_name["accuracy"]) == (by_code["n"], by_code["accuracy"])
    unknown = write_sheet(tmp_path / "odd.csv", ["text", "label"], [["Sales rose", "7"]])
    assert_user_error(
        cli("eval", runs["codes"], "--data", unknown), f"{unknown}:2: unknown label '7'"
    )


def test_eval_text_gives_the_accuracy_interval_and_a_small_set_note(
    cli: Callable[..., Result], runs: dict[str, Path], tmp_path: Path, other_rows: list[Example]
) -> None:
    from finlora.metrics import wilson_interval

    path = write_sheet(
        tmp_path / "more.csv", ["Headline", "Sentiment"], [[e.text, e.label] for e in other_rows]
    )
    result = cli("eval", runs["names"], "--data", path, "--no-progress")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    n = len(other_rows)
    accuracy = float(lines[2].split()[1])
    low, high = wilson_interval(round(accuracy * n), n)
    assert lines[2].startswith(f"accuracy {accuracy:.4f} (95% CI {low:.3f}-{high:.3f})   ")
    assert lines[3] == (
        f"(only {n} rows: the accuracy is known to within the interval beside it; runs that "
        "differ by less cannot be told apart here)"
    )


def test_predict_out_keeps_the_sheet_its_dialect_and_the_true_label(
    cli: Callable[..., Result], runs: dict[str, Path], tmp_path: Path, other_rows: list[Example]
) -> None:
    sheet = write_sheet(
        tmp_path / "sheet.csv",
        ["Id", "Headline", "Sentiment", "Desk"],
        [[f"r{i}", e.text, e.label, "FX"] for i, e in enumerate(other_rows)],
        sep=";",
    )
    out = tmp_path / "labelled.csv"
    result = cli("predict", runs["names"], "--file", sheet, "--out", out)
    assert result.code == 0, result.err
    assert result.err == f"wrote {len(other_rows)} predictions to {out}\n"
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # as the input had one, for Excel
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""), delimiter=";"))
    header = ["Id", "Headline", "Sentiment", "Desk", "true_label", "predicted"]
    assert rows[0] == [*header, "p_Bearish", "p_Bullish", "p_Neutral"]
    assert [r[:5] for r in rows[1:]] == [
        [f"r{i}", e.text, e.label, "FX", e.label] for i, e in enumerate(other_rows)
    ]
    assert {r[5] for r in rows[1:]} <= {"Bearish", "Bullish", "Neutral"}
    # predicted on again: its own columns are replaced, not repeated
    again = tmp_path / "again.csv"
    assert cli("predict", runs["names"], "--file", out, "--out", again).code == 0
    assert next(csv.reader(io.StringIO(again.read_text("utf-8-sig")), delimiter=";")) == rows[0]


def test_predict_maps_the_true_label_and_reads_excel(
    cli: Callable[..., Result], runs: dict[str, Path], tmp_path: Path, other_rows: list[Example]
) -> None:
    pd = pytest.importorskip("pandas")
    codes = write_sheet(
        tmp_path / "tfns.csv", ["text", "label"], [[e.text, CODES[e.label]] for e in other_rows]
    )
    out = tmp_path / "tfns-labelled.jsonl"
    assert cli("predict", runs["codes"], "--file", codes, "--out", out).code == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert list(records[0]) == ["text", "label", "true_label", "predicted", "probabilities"]
    assert [r["true_label"] for r in records] == [e.label for e in other_rows]
    assert [r["label"] for r in records] == [CODES[e.label] for e in other_rows]
    book = tmp_path / "desk.xlsx"
    frame = pd.DataFrame(
        {"Headline": [e.text for e in other_rows], "Score": range(len(other_rows))}
    )
    frame.to_excel(book, index=False)
    listed = cli("predict", runs["names"], "--file", book, "--json")
    assert listed.code == 0, listed.err
    assert [json.loads(line)["text"] for line in listed.out.splitlines()] == [
        e.text for e in other_rows
    ]
    out_csv = tmp_path / "desk.csv"
    assert cli("predict", runs["names"], "--file", book, "--out", out_csv).code == 0
    header = out_csv.read_bytes().split(b"\r\n", 1)[0]
    assert header == b"Headline,Score,predicted,p_Bearish,p_Bullish,p_Neutral"  # no label column
    missing = cli("predict", runs["names"], "--file", book, "--label-column", "Sentiment")
    assert_user_error(missing, f"{book}: no column 'Sentiment' (columns: Headline, Score)")


def test_predict_notes_repaired_text(
    cli: Callable[..., Result], runs: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "tweets.csv"
    path.write_text("Headline\nProfit rose\n\u0080 100 million plant opens\n\n", encoding="utf-8")
    result = cli("predict", runs["names"], "--file", path, "--json")
    assert result.code == 0, result.err
    assert result.err == (
        "note: repaired mis-decoded characters (C1 controls, mojibake) in 1 of 2 rows, the first "
        f"at {path}:3\n"
    )
    assert [json.loads(line)["text"] for line in result.out.splitlines()] == [
        "Profit rose",
        "\u20ac 100 million plant opens",
    ]


def test_help_says_the_raw_labels_are_the_names(cli: Callable[..., Result]) -> None:
    for command in ("eval", "predict"):
        text = " ".join(cli(command, "--help").out.split())
        assert "the raw labels are the names" in text, command
        assert "default: the run's data.text_column" in text, command
