"""Instruction data: Alpaca and chat records from .json lists and .jsonl files, one-line errors
that name the file and line, and the packaged financial instruction set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finlora.data import FPB_LABELS
from finlora.data.fin_instruct import SENTIMENT_QUESTIONS, fin_instruct_set
from finlora.data.instruct import Message, load_instruct, write_jsonl
from finlora.errors import FinloraError
from finlora.textmetrics import labels_named

ALPACA = {"instruction": "What is EBITDA?", "output": "Earnings before interest."}
WITH_INPUT = {
    "instruction": "Compute the P/E ratio.",
    "input": "Share price EUR 42.00, EPS EUR 3.50.",
    "output": "12.0",
}
LABELLED = {
    "instruction": "Sentiment?",
    "input": "Sales fell 9 %.",
    "output": "Negative.",
    "label": "negative",
    "labels": list(FPB_LABELS),
}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is EBIT?"},
        {"role": "assistant", "content": "Operating profit."},
        {"role": "user", "content": "And EBITDA?"},
        {"role": "assistant", "content": "EBIT plus depreciation and amortisation."},
    ]
}


def jsonl(path: Path, *rows: object) -> Path:
    """One line per row: dicts are dumped as JSON, strings written as they are."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_alpaca_jsonl(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "a.jsonl", ALPACA, WITH_INPUT)
    plain, with_input = load_instruct(path)
    assert plain.messages == (
        Message("user", "What is EBITDA?"),
        Message("assistant", "Earnings before interest."),
    )
    assert plain.instruction == "What is EBITDA?" and plain.input == ""
    assert plain.response == "Earnings before interest."
    assert plain.source == f"{path}:1" and with_input.source == f"{path}:2"
    # The chat form of an Alpaca record joins the instruction and its input.
    assert with_input.prompt_messages == (
        Message("user", "Compute the P/E ratio.\n\nShare price EUR 42.00, EPS EUR 3.50."),
    )
    assert with_input.input == "Share price EUR 42.00, EPS EUR 3.50."
    assert plain.label is None and plain.labels == ()


def test_alpaca_input_null_means_no_input(tmp_path: Path) -> None:
    (record,) = load_instruct(jsonl(tmp_path / "a.jsonl", {**ALPACA, "input": None}))
    assert (
        record.input == ""
        and record.messages == load_instruct(jsonl(tmp_path / "b.jsonl", ALPACA))[0].messages
    )


def test_json_list_records_start_on_their_own_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ALPACA, CHAT, WITH_INPUT], indent=2), encoding="utf-8")
    records = load_instruct(path)
    assert [r.response for r in records] == [
        "Earnings before interest.",
        "EBIT plus depreciation and amortisation.",
        "12.0",
    ]
    text = path.read_text(encoding="utf-8").splitlines()
    for record in records:
        line = int(record.source.rsplit(":", 1)[1])
        assert text[line - 1].strip() == "{", (record.source, text[line - 1])


def test_chat_record(tmp_path: Path) -> None:
    (record,) = load_instruct(jsonl(tmp_path / "c.jsonl", CHAT))
    assert [m.role for m in record.messages] == [
        "system", "user", "assistant", "user", "assistant"
    ]  # fmt: skip
    assert record.response == "EBIT plus depreciation and amortisation."
    assert record.prompt_messages[-1] == Message("user", "And EBITDA?")
    assert record.instruction is None and record.label is None


def test_mixed_file_with_blank_lines_keeps_line_numbers(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "m.jsonl", ALPACA, "", "   ", CHAT, LABELLED)
    records = load_instruct(path)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert [r.instruction is None for r in records] == [False, True, False]


def test_label_and_labels(tmp_path: Path) -> None:
    chat_labelled = {**CHAT, "label": "positive"}
    only_label = {**ALPACA, "label": "neutral"}
    path = jsonl(tmp_path / "l.jsonl", LABELLED, chat_labelled, only_label)
    labelled, chat, only = load_instruct(path)
    assert labelled.label == "negative" and labelled.labels == FPB_LABELS
    assert chat.label == "positive" and chat.labels == ()
    assert only.label == "neutral" and only.labels == ()


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    records = load_instruct(jsonl(tmp_path / "in.jsonl", ALPACA, WITH_INPUT, LABELLED, CHAT))
    out = tmp_path / "out.jsonl"
    write_jsonl(records, out)
    again = load_instruct(out)
    strip = [(r.messages, r.instruction, r.input, r.label, r.labels) for r in records]
    assert [(r.messages, r.instruction, r.input, r.label, r.labels) for r in again] == strip


def _messages(*pairs: tuple[object, object]) -> dict[str, object]:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


GOOD = json.dumps(ALPACA)
BAD_RECORDS = {
    "missing output": ({"instruction": "Explain EBIT."}, "missing 'output'"),
    "output not a string": (
        {"instruction": "Explain EBIT.", "output": 12},
        "'output' must be a string (got int)",
    ),
    "empty instruction": ({"instruction": "  ", "output": "x"}, "empty 'instruction'"),
    "input not a string": (
        {"instruction": "x", "input": ["a"], "output": "y"},
        "'input' must be a string (got list)",
    ),
    "neither shape": ({"text": "x", "label": "positive"}, "neither an Alpaca record"),
    "not an object": (["What is EBIT?", "Operating profit."], "expected an object, got list"),
    "label not in labels": (
        {**ALPACA, "label": "great", "labels": list(FPB_LABELS)},
        "label 'great' is not in its 'labels'",
    ),
    "empty label": ({**ALPACA, "label": ""}, "'label' must be a non-empty string"),
    "labels not a list": ({**ALPACA, "labels": "positive"}, "'labels' must be a list"),
    "unknown role": (
        _messages(("user", "Hi"), ("bot", "Hello")),
        "messages[1]: role must be one of system, user, assistant (got 'bot')",
    ),
    "system not first": (
        _messages(("user", "Hi"), ("system", "Be brief."), ("assistant", "Hello")),
        "messages[1]: a system message may only come first",
    ),
    "last message not assistant": (
        _messages(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")),
        "the last message must be the assistant's answer",
    ),
    "two user turns": (
        _messages(("user", "Hi"), ("user", "Anyone?"), ("assistant", "Hello")),
        "turns must alternate user, assistant, starting with user",
    ),
    "assistant first": (
        _messages(("system", "Be brief."), ("assistant", "Hello")),
        "turns must alternate user, assistant, starting with user",
    ),
    "empty content": (
        _messages(("user", ""), ("assistant", "Hello")),
        "messages[0]: empty 'content'",
    ),
    "content not a string": (
        _messages(("user", None), ("assistant", "Hello")),
        "messages[0]: 'content' must be a string (got NoneType)",
    ),
    "empty messages": ({"messages": []}, "'messages' must be a non-empty list"),
    "message not an object": (
        {"messages": ["Hi", {"role": "assistant", "content": "Hello"}]},
        "messages[0] must be an object with 'role' and 'content'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_names_file_and_line(tmp_path: Path, case: str) -> None:
    record, fragment = BAD_RECORDS[case]
    path = jsonl(tmp_path / "bad.jsonl", GOOD, "", GOOD, record, GOOD)
    with pytest.raises(FinloraError) as err:
        load_instruct(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4: "), message
    assert fragment in message, message
    assert "\n" not in message


def test_malformed_json_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "bad.jsonl", GOOD, GOOD, '{"instruction": "x", "output": ')
    with pytest.raises(FinloraError, match=r"^.*bad\.jsonl:3: malformed JSON \(") as err:
        load_instruct(path)
    assert str(err.value).startswith(f"{path}:3: ")


def test_json_list_bad_record_on_its_start_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    # Pretty-printed: the third record starts on line 11; its fault is on none of its lines.
    path.write_text(
        json.dumps([ALPACA, WITH_INPUT, {"instruction": "Explain EBIT."}], indent=2),
        encoding="utf-8",
    )
    assert path.read_text(encoding="utf-8").splitlines()[10:13] == [
        "  {",
        '    "instruction": "Explain EBIT."',
        "  }",
    ]
    with pytest.raises(FinloraError) as err:
        load_instruct(path)
    assert str(err.value) == f"{path}:11: missing 'output'"


def test_json_list_malformed_json_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(f'[\n{GOOD},\n{GOOD},\n{{"instruction": oops}}\n]\n', encoding="utf-8")
    with pytest.raises(FinloraError) as err:
        load_instruct(path)
    assert str(err.value).startswith(f"{path}:4: malformed JSON (")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[\n" + GOOD + ",\n", "unterminated JSON list"),
        ("[]\n", "no instruction records"),
        ("\n\n  \n", "file is empty"),
    ],
)
def test_whole_file_problems(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FinloraError) as err:
        load_instruct(path)
    assert str(err.value) == f"{path}: {fragment}"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FinloraError, match="no such file"):
        load_instruct(tmp_path / "nope.jsonl")
    with pytest.raises(FinloraError, match="is a directory"):
        load_instruct(tmp_path)


# ---- the packaged set --------------------------------------------------------------------------


def test_packaged_set_size_and_order() -> None:
    records = fin_instruct_set()
    assert len(records) == SENTIMENT_QUESTIONS + 90 == 240
    assert [r.source for r in records[:2]] == ["finlora:sentiment:0", "finlora:sentiment:1"]
    assert records[SENTIMENT_QUESTIONS].source == "finlora:concepts:0"
    assert all(r.instruction and r.response.strip() for r in records)
    assert fin_instruct_set() == records  # deterministic


def test_sentiment_answers_name_exactly_their_own_label() -> None:
    sentiment = fin_instruct_set()[:SENTIMENT_QUESTIONS]
    for record in sentiment:
        assert record.labels == FPB_LABELS and record.label in FPB_LABELS
        assert record.input  # the news sentence
        assert labels_named(record.response, FPB_LABELS) == [record.label], record.response
    assert {r.label for r in sentiment} == set(FPB_LABELS)


def test_concept_answers_carry_and_name_no_label() -> None:
    concepts = fin_instruct_set()[SENTIMENT_QUESTIONS:]
    for record in concepts:
        assert record.label is None and record.labels == ()
        assert labels_named(record.response, FPB_LABELS) == [], record.response
    # Authored questions are all different.
    assert len({(r.instruction, r.input) for r in concepts}) == len(concepts)
