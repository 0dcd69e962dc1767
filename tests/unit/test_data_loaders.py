"""Loaders: encodings and repairs, FPB, tables (CSV / TSV / JSON Lines, Parquet, Excel, datasets
directories), format dispatch, error messages."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from finlora.data import (
    FPB_FILES,
    Example,
    load_examples,
    load_fpb,
    load_table,
    parse_label_map,
    read_text,
)
from finlora.data.loaders import repair_note
from finlora.errors import FinloraError

FPB_DIR = os.environ.get("FINLORA_FPB_DIR")
needs_fpb = pytest.mark.skipif(not FPB_DIR, reason="set FINLORA_FPB_DIR to the FPB v1.0 folder")


def write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", newline="")
    else:
        path.write_bytes(data)
    return path


def one_line(err: pytest.ExceptionInfo[FinloraError]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# read_text


def test_read_text_utf8_strips_bom(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "\ufeffCafé 5 €\n".encode())
    assert read_text(path) == "Café 5 €\n"


def test_read_text_falls_back_to_latin1(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "Café Åbo\r\n".encode("latin-1"))
    assert read_text(path) == "Café Åbo\r\n"


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"abc\x81def", 3),  # C1 byte: invalid UTF-8 and never in real Latin-1 text
        (b"ab\xe9\x00cd", 3),  # NUL in otherwise Latin-1 text
        (b"abcd\x00", 4),  # NUL in otherwise valid UTF-8
    ],
)
def test_read_text_refuses_binary(tmp_path: Path, data: bytes, offset: int) -> None:
    path = write(tmp_path / "data.txt", data)
    with pytest.raises(FinloraError) as err:
        read_text(path)
    message = one_line(err)
    assert message.startswith(f"{path}: undecodable bytes at byte offset {offset} ")
    assert "neither UTF-8 nor Latin-1 text" in message


def test_read_text_offset_counts_bom_and_utf8_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "data.txt", b"\xef\xbb\xbf\xc3\xa9\x01")
    with pytest.raises(FinloraError, match="byte offset 5 "):
        read_text(path)


def test_read_text_missing_empty_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FinloraError) as err:
        read_text(tmp_path / "nope.txt")
    assert one_line(err) == f"{tmp_path / 'nope.txt'}: no such file"
    path = write(tmp_path / "blank.txt", " \n\t\n")
    with pytest.raises(FinloraError) as err:
        read_text(path)
    assert one_line(err) == f"{path}: file is empty"
    with pytest.raises(FinloraError) as err:
        read_text(tmp_path)
    assert one_line(err) == f"{tmp_path}: is a directory, expected a data file"


# Financial PhraseBank

FPB_TEXT = (
    "Sales rose 5 % to EUR 10 mn .@positive\n"
    "\n"
    "Contact ir@example.com for details .@neutral\r\n"
    "Profit fell .@ negative \n"
)


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_load_fpb_file(tmp_path: Path, encoding: str) -> None:
    path = write(tmp_path / "fpb.txt", ("Café Åbo grew .@positive\n" + FPB_TEXT).encode(encoding))
    assert load_fpb(path) == [
        Example("Café Åbo grew .", "positive", f"{path}:1"),
        Example("Sales rose 5 % to EUR 10 mn .", "positive", f"{path}:2"),
        Example("Contact ir@example.com for details .", "neutral", f"{path}:4"),
        Example("Profit fell .", "negative", f"{path}:5"),
    ]


def test_load_fpb_directory_picks_agreement(tmp_path: Path) -> None:
    write(tmp_path / FPB_FILES["all"], "A .@neutral\n")
    write(tmp_path / FPB_FILES["66"], "B .@positive\nC .@negative\n")
    assert [e.text for e in load_fpb(tmp_path)] == ["A ."]
    assert [e.label for e in load_fpb(tmp_path, agreement="66")] == ["positive", "negative"]
    with pytest.raises(FinloraError) as err:
        load_fpb(tmp_path, agreement="75")
    assert one_line(err).startswith(f"{tmp_path}: no {FPB_FILES['75']} here; a directory is read")


def test_load_fpb_unknown_agreement(tmp_path: Path) -> None:
    with pytest.raises(FinloraError) as err:
        load_fpb(tmp_path, agreement="90")
    assert one_line(err) == "unknown FPB agreement '90' (expected one of all, 75, 66, 50)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A .@neutral\n\nno separator here\n", "3: no '@' label separator"),
        (
            "A .@neutral\nB .@foo\n",
            "2: unknown label 'foo' (expected one of negative, neutral, positive)",
        ),
        ("@neutral\n", "1: empty sentence before '@neutral'"),
    ],
)
def test_load_fpb_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "fpb.txt", text)
    with pytest.raises(FinloraError) as err:
        load_fpb(path)
    assert one_line(err) == f"{path}:{message}"


@needs_fpb
def test_real_fpb_all_agree_counts() -> None:
    examples = load_fpb(Path(str(FPB_DIR)))
    assert len(examples) == 2264
    assert Counter(e.label for e in examples) == {"negative": 303, "neutral": 1391, "positive": 570}


@needs_fpb
def test_real_fpb_50_agree_loads() -> None:
    examples = load_examples(Path(str(FPB_DIR)), agreement="50")
    assert len(examples) == 4846
    assert examples[0].source.endswith("Sentences_50Agree.txt:1")


# label maps


def test_parse_label_map() -> None:
    assert parse_label_map(" 0 = negative,1=positive , 2=neutral ") == {
        "0": "negative",
        "1": "positive",
        "2": "neutral",
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0=negative,1positive", "label map '0=negative,1positive': bad entry '1positive'"),
        ("0=negative,,1=positive", "bad entry ''"),
        ("=negative", "bad entry '=negative'"),
        ("0=", "bad entry '0='"),
        ("0=negative,0=positive", "'0' is mapped twice"),
    ],
)
def test_parse_label_map_errors(spec: str, message: str) -> None:
    with pytest.raises(FinloraError, match=message.replace("(", r"\(")):
        parse_label_map(spec)


# tables


def test_load_csv_with_quotes_and_label_map(tmp_path: Path) -> None:
    path = write(
        tmp_path / "news.csv",
        'id,sentence,sentiment\r\n1,"Sales rose, strongly",Bullish\r\n'
        "\r\n"
        "2, Costs fell ,Bearish\r\n",
    )
    examples = load_table(
        path,
        text_column="sentence",
        label_column="sentiment",
        label_map={"Bearish": "negative", "Bullish": "positive"},
        labels=("negative", "neutral", "positive"),
    )
    assert examples == [
        Example("Sales rose, strongly", "positive", f"{path}:2"),
        Example("Costs fell", "negative", f"{path}:4"),
    ]


def test_load_csv_multiline_field_keeps_start_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", 'text,label\n"two\nlines",x\n"",y\n')
    with pytest.raises(FinloraError) as err:
        load_table(path)
    assert one_line(err) == f"{path}:4: empty text in column 'text'"


def test_load_tsv(tmp_path: Path) -> None:
    path = write(tmp_path / "a.tsv", "label\ttext\nneutral\tA, B and C .\n")
    assert load_table(path) == [Example("A, B and C .", "neutral", f"{path}:2")]


def test_load_jsonl_stringifies_int_labels(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.jsonl", '{"text": "Up .", "label": 2}\n\n{"text": "Down .", "label": 0}\n'
    )
    examples = load_table(path, label_map=parse_label_map("0=negative,1=neutral,2=positive"))
    assert examples == [
        Example("Up .", "positive", f"{path}:1"),
        Example("Down .", "negative", f"{path}:3"),
    ]


def test_load_json_one_object_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", '{"text": "A .", "label": "neutral"}\n')
    assert load_examples(path) == [Example("A .", "neutral", f"{path}:1")]


def test_load_json_list_of_objects(tmp_path: Path) -> None:
    content = '[\n {"text": "A .", "label": "neutral"},\n\n {"text": "B .", "label": 2}\n]\n'
    path = write(tmp_path / "a.json", content)
    assert load_examples(path) == [
        Example("A .", "neutral", f"{path}:2"),
        Example("B .", "2", f"{path}:4"),
    ]


@pytest.mark.parametrize("delimiter", [";", "|", "\t"])
def test_load_csv_written_with_another_delimiter(tmp_path: Path, delimiter: str) -> None:
    # As a spreadsheet in a European locale saves "CSV": semicolons, decimal commas.
    rows = ["id;text;label", '1;"Sales rose 3,5 %; margin held";positive', "2;Flat year;neutral"]
    path = write(tmp_path / "a.csv", "\n".join(rows).replace(";", delimiter) + "\n")
    assert load_table(path) == [
        Example(f"Sales rose 3,5 %{delimiter} margin held", "positive", f"{path}:2"),
        Example("Flat year", "neutral", f"{path}:3"),
    ]
    # A comma header keeps the comma, whatever the text holds.
    path = write(tmp_path / "b.csv", 'text,label\n"A; B",neutral\n')
    assert load_table(path) == [Example("A; B", "neutral", f"{path}:2")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", "text,y\nA,1\n", ": no column 'label' (columns: text, y)"),
        ("a.csv", "text,label\nA,x\nB,\n", ":3: missing label in column 'label'"),
        ("a.csv", "text,label\nA,x\n  ,x\n", ":3: empty text in column 'text'"),
        ("a.csv", "text,label\nA,x\nB,x,extra\n", ":3: 3 fields but the header has 2"),
        ("a.csv", "text,label\nA,bullish\n", ":2: unknown label 'bullish' (expected one of x, y)"),
        (
            "a.jsonl",
            '{"text": "A", "label": "x"}\n{"text": "B", \n',
            ":2: malformed JSON (Expecting property name enclosed in double quotes at column 15;",
        ),
        ("a.jsonl", '["A", "x"]\n', ":1: expected a JSON object, got list"),
        ("a.jsonl", '{"text": "A", "lbl": "x"}\n', ":1: no column 'label' (columns: text, lbl)"),
        ("a.jsonl", '{"text": "A", "label": null}\n', ":1: missing label in column 'label'"),
        ("a.jsonl", '{"text": ["A"], "label": "x"}\n', ":1: column 'text' holds a list"),
        (
            "a.json",
            '[\n {"text": "A", "label": "x"},\n {"text": \n]',
            ":4: malformed JSON (Expecting value",
        ),
        ("a.json", '[\n {"text": "A", "label": "x"},\n ["B"]\n]', ":3: expected a JSON object"),
        ("a.json", '[\n {"text": "A", "label": "x"}\n', ": unterminated JSON list"),
        # A stray quote would swallow the rows after it into one text.
        ("a.csv", 'text,label\nA,x\n"B rose 5 %,x\nC "fell",y\nD,x\n', ":3: malformed ',' table"),
        ("a.csv", "text,label,text\nA,x,B\n", ":1: column 'text' appears more than once"),
    ],
)
def test_table_errors_name_file_and_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(FinloraError) as err:
        load_table(path, label_map={"x": "neutral", "y": "positive"})
    assert one_line(err).startswith(f"{path}{message}")


def test_table_label_outside_allowed_set(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "text,label\nA,neutral\nB,mixed\n")
    with pytest.raises(FinloraError) as err:
        load_table(path, labels=("negative", "neutral", "positive"))
    assert one_line(err) == (
        f"{path}:3: unknown label 'mixed' (expected one of negative, neutral, positive)"
    )


def test_table_unknown_suffix(tmp_path: Path) -> None:
    path = write(tmp_path / "a.xls", "x")  # the Excel format before 2007: not read
    with pytest.raises(FinloraError) as err:
        load_table(path)
    assert one_line(err) == (
        f"{path}: cannot tell the table format from suffix '.xls' "
        "(expected one of .csv, .tsv, .jsonl, .json, .parquet, .xlsx)"
    )


# load_examples


def test_load_examples_auto_and_explicit_format(tmp_path: Path) -> None:
    fpb = write(tmp_path / "fpb.txt", "A .@neutral\n")
    assert load_examples(fpb) == [Example("A .", "neutral", f"{fpb}:1")]
    odd = write(tmp_path / "data.dat", "text\tlabel\nB .\tpositive\n")
    assert load_examples(odd, fmt="tsv") == [Example("B .", "positive", f"{odd}:2")]


def test_load_examples_directory_is_fpb(tmp_path: Path) -> None:
    write(tmp_path / FPB_FILES["50"], "A .@negative\n")
    assert load_examples(tmp_path, agreement="50")[0].label == "negative"


def test_load_examples_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "text,label\n")
    with pytest.raises(FinloraError) as err:
        load_examples(path)
    assert one_line(err) == f"{path}: no examples"
    with pytest.raises(FinloraError) as err:
        load_examples(path, fmt="feather")
    assert one_line(err) == (
        "unknown data format 'feather' "
        "(expected one of auto, fpb, csv, tsv, jsonl, parquet, xlsx, hf)"
    )
    with pytest.raises(FinloraError) as err:
        load_examples(path, fmt="parquet")
    assert one_line(err).startswith(f"{path}: not a readable Parquet file (")
    with pytest.raises(FinloraError) as err:
        load_examples(tmp_path / "missing.csv")
    assert one_line(err) == f"{tmp_path / 'missing.csv'}: no such file"
    odd = write(tmp_path / "a.dat", "x")
    with pytest.raises(FinloraError, match=r"a\.dat: cannot tell the format from suffix '\.dat'"):
        load_examples(odd)


def test_windows_1252_csv_reads_as_excel_wrote_it(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(
        "text,label\n\u201cProfit\u201d rose \u20ac5 mn \u2013 up,x\n".encode("cp1252")
    )
    assert load_table(path) == [
        Example("\u201cProfit\u201d rose \u20ac5 mn \u2013 up", "x", f"{path}:2")
    ]


def test_labels_as_pandas_and_json_write_them(tmp_path: Path) -> None:
    bools = write(tmp_path / "b.csv", "text,label\nA,True\nB,False\n")
    assert [e.label for e in load_table(bools, label_map={"true": "up", "false": "down"})] == [
        "up",
        "down",
    ]
    csv_path = write(tmp_path / "a.csv", "text,label\nA,1.0\nB,0.0\n")
    assert [e.label for e in load_table(csv_path, label_map={"0": "down", "1": "up"})] == [
        "up",
        "down",
    ]
    json_path = write(
        tmp_path / "a.jsonl", '{"text": "A", "label": true}\n{"text": "B", "label": 2.0}\n'
    )
    assert [e.label for e in load_table(json_path)] == ["true", "2"]


def test_labels_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    from finlora.config import DataConfig
    from finlora.data.prepare import prepare_data

    rows = "".join(
        f"Row {i},{'Positive' if i % 3 == 0 else 'positive' if i % 3 == 1 else 'negative'}\n"
        for i in range(30)
    )
    path = write(tmp_path / "a.csv", "text,label\n" + rows)
    with pytest.raises(FinloraError, match="labels 'Positive' and 'positive' differ only in case"):
        prepare_data(DataConfig(path=str(path)), seed=0)
    fpb = write(tmp_path / "fpb.txt", "Sales rose .@positive\n")
    with pytest.raises(FinloraError, match="a label map applies to CSV, TSV and JSON tables"):
        prepare_data(DataConfig(path=str(fpb), label_map="1=positive"), seed=0)


# Files as found: repaired text, Parquet, Excel, datasets directories

TFNS = (
    Path(__file__).resolve().parents[2].parent
    / "shared/data/twitter-financial-news-sentiment/sent_train.csv"
)


def test_c1_controls_and_mojibake_are_repaired_and_noted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "news.csv",
        "text,label\n"
        "Profit rose 5 %,up\n"
        "\u0080 100 million plant opens,up\n"  # "€" through a Windows-1252 round trip
        '"He said ""it is possible,\'\u009d but",down\n'  # the last byte of a closing quote
        "Sales at Caf\u00c3\u00a9 Nord fell \u00e2\u20ac\u201c again,down\n"  # UTF-8 read as cp1252
        "\u201cNo change\u201d \u2014 na\u00efve r\u00e9sum\u00e9 \u20ac5,flat\n",  # clean: kept
    )
    examples = load_examples(path)
    assert [e.text for e in examples] == [
        "Profit rose 5 %",
        "\u20ac 100 million plant opens",
        "He said \"it is possible,' but",
        "Sales at Caf\u00e9 Nord fell \u2013 again",
        "\u201cNo change\u201d \u2014 na\u00efve r\u00e9sum\u00e9 \u20ac5",
    ]
    assert [e.repaired for e in examples] == [False, True, True, True, False]
    assert repair_note(examples) == (
        "repaired mis-decoded characters (C1 controls, mojibake) in 3 of 5 rows, the first at "
        f"{path}:3"
    )
    assert repair_note(examples[:1]) is None


def test_a_few_stray_controls_are_no_reason_to_refuse_a_file(tmp_path: Path) -> None:
    rows = "".join(f"Row {i} of the sheet,up\n" for i in range(200))
    path = write(tmp_path / "a.csv", "text,label\nSales\x0bnote,up\n" + rows)
    assert load_table(path)[0] == Example("Sales note", "up", f"{path}:2")
    # Windows-1252 with a byte it leaves undefined (0x9D) and its curly quotes
    cp1252 = b"text,label\n\x93Quoted\x94 \x9d,up\n" + rows.encode()
    assert load_table(write(tmp_path / "b.csv", cp1252))[0].text == "\u201cQuoted\u201d"
    with pytest.raises(FinloraError, match="undecodable bytes at byte offset 3 "):
        read_text(write(tmp_path / "c.csv", b"abc" + bytes(range(1, 9)) * 3 + b"\n"))


@pytest.mark.skipif(not TFNS.is_file(), reason="../shared/data holds the TFNS file")
def test_twitter_financial_news_loads_as_it_is_with_a_note() -> None:
    tfns = parse_label_map("0=Bearish,1=Bullish,2=Neutral")
    examples = load_examples(TFNS, label_map=tfns)
    assert Counter(e.label for e in examples) == {"Bearish": 1442, "Bullish": 1923, "Neutral": 6178}
    assert not any(c in e.text for e in examples for c in map(chr, range(0x80, 0xA0)))
    note = repair_note(examples)
    assert note == (
        "repaired mis-decoded characters (C1 controls, mojibake) in 43 of 9543 rows, the first "
        f"at {TFNS}:414"
    )
    first = next(e for e in examples if e.repaired)
    assert first.text.startswith(
        "Janet Yellen says a V-shaped economic recovery \"is possible,' but"
    )


def test_parquet(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "news.parquet"
    frame = pd.DataFrame({"Headline": ["Profit up", "Caf\u00c3\u00a9 sales down"], "y": [1, 0]})
    frame.to_parquet(path)
    examples = load_examples(
        path, text_column="Headline", label_column="y", label_map={"0": "down", "1": "up"}
    )
    assert examples == [
        Example("Profit up", "up", f"{path}:1"),
        Example("Caf\u00e9 sales down", "down", f"{path}:2"),
    ]
    assert repair_note(examples) is not None
    with pytest.raises(FinloraError) as err:
        load_examples(path, text_column="headline", label_column="y")
    assert one_line(err) == (
        f"{path}: no column 'headline' (columns: Headline, y); did you mean 'Headline'?"
    )
    broken = write(tmp_path / "broken.parquet", "text,label\nA,b\n")
    with pytest.raises(FinloraError) as err:
        load_examples(broken)
    assert one_line(err).startswith(f"{broken}: not a readable Parquet file (")


def test_xlsx(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "sheet.xlsx"
    frame = pd.DataFrame({"Headline": ["Profit up", None, "Sales down"], "Sentiment": [
        "Bullish", None, "Bearish"]})  # fmt: skip
    frame.to_excel(path, index=False)
    # the sheet's own row numbers: the header is row 1; the blank row 3 is skipped
    assert load_examples(path, text_column="Headline", label_column="Sentiment") == [
        Example("Profit up", "Bullish", f"{path}:2"),
        Example("Sales down", "Bearish", f"{path}:4"),
    ]
    with pytest.raises(FinloraError) as err:
        load_examples(path, text_column="Headline", label_column="sentiment")
    assert one_line(err).endswith("did you mean 'Sentiment'?")
    not_xlsx = write(tmp_path / "renamed.xlsx", "text,label\nA,b\n")
    with pytest.raises(FinloraError) as err:
        load_examples(not_xlsx)
    assert one_line(err).startswith(f"{not_xlsx}: not a readable .xlsx workbook (")


def test_datasets_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from finlora.data.loaders import files_read

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["bear", "bull"])}
    )
    dataset = datasets.Dataset.from_dict(
        {"text": ["Profit up", "Sales down"], "label": [1, 0]}, features=features
    )
    path = tmp_path / "tweets"
    dataset.save_to_disk(str(path))
    # auto: a directory with dataset_info.json; a ClassLabel column gives its names
    expected = [
        Example("Profit up", "bull", f"{path}:1"),
        Example("Sales down", "bear", f"{path}:2"),
    ]
    assert load_examples(path) == expected
    assert load_examples(path, "hf") == expected
    assert load_table(path) == expected
    assert files_read(path, "auto", "all") == [path / "data-00000-of-00001.arrow"]
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(splits))
    with pytest.raises(FinloraError) as err:
        load_examples(splits)
    assert one_line(err) == (
        f"{splits}: a DatasetDict with splits train, test; name one split's directory "
        f"(e.g. {splits / 'train'})"
    )
    assert load_examples(splits / "test") == [
        Example(e.text, e.label, f"{splits / 'test'}:{i}") for i, e in enumerate(expected, 1)
    ]
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(FinloraError, match=f"{plain}: not a readable datasets directory"):
        load_examples(plain, "hf")


def test_format_follows_the_suffix_then_the_run(tmp_path: Path) -> None:
    from finlora.config import DataConfig
    from finlora.config.sections import DataSource
    from finlora.data.loaders import format_for, run_reading

    tsv_run = DataConfig(path="train.txt", format="tsv", text_column="Headline")
    csv_run = DataConfig(path="train.csv")  # auto: csv by its suffix
    assert format_for(tmp_path / "more.txt", tsv_run) == "tsv"
    assert format_for(tmp_path / "more.txt", csv_run) == "csv"
    assert format_for(tmp_path / "more.jsonl", tsv_run) == "jsonl"
    assert format_for(tmp_path / "more.xlsx", DataConfig()) == "xlsx"
    assert format_for(tmp_path / "more.txt", DataConfig()) == "auto"
    two = DataConfig(
        sources=[
            DataSource(path=str(tmp_path / "a.csv"), text_column="a"),
            DataSource(path=str(tmp_path / "b.parquet"), text_column="b"),
        ]
    )
    assert run_reading(two, tmp_path / "b.parquet").text_column == "b"
    assert run_reading(two, tmp_path / "other.parquet").text_column == "b"
    assert run_reading(two, tmp_path / "other.jsonl").text_column == "a"
    assert run_reading(tsv_run, tmp_path / "x.csv") is tsv_run
