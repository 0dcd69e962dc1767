"""Property-based tests (hypothesis) of what reads user input: data files (Financial PhraseBank,
CSV / TSV / JSON Lines tables), label maps, `--set` items and prompt templates.

The property: whatever the input holds (random bytes, C1 controls, BOMs, NULs, mixed encodings,
ragged rows, JSON that is not an object), reading it ends in a result or in a `FinloraError`
whose message is one line, never in another exception (a traceback at the command line), and
never leaves a file behind or rewrites the one it read.

Generated file names hold no line breaks: paths are shown as given in every message.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from finlora.config import RunConfig, load_config
from finlora.data.examples import Example
from finlora.data.loaders import (
    FPB_LABELS,
    load_examples,
    load_fpb,
    load_table,
    load_texts,
    parse_label_map,
)
from finlora.data.textfile import decode_text, read_text
from finlora.errors import FinloraError
from finlora.prompts import InstructTemplate, PromptTemplate

T = TypeVar("T")

# Enough examples to reach the odd corners in well under a minute on two busy cores.
FAST = settings(max_examples=1000, deadline=None)
SLOW = settings(max_examples=400, deadline=None)


def outcome(call: Callable[[], T]) -> T | FinloraError:
    """What `call` returns, or the FinloraError it raised, once its message is checked to be
    one line (as str.splitlines counts them, so U+0085 and U+2028 break a line too)."""
    try:
        result = call()
    except FinloraError as exc:
        message = str(exc)
        assert message.strip(), "an empty error message"
        assert len(message.splitlines()) == 1, f"a message of several lines: {message!r}"
        event("FinloraError")  # --hypothesis-show-statistics: how often each way ends
        return exc
    event("result")
    return result


def read_file(name: str, data: bytes, read: Callable[[Path], T]) -> T | FinloraError:
    """`read(path)` on a file `name` holding `data`, alone in a fresh directory; the file must
    stay as it was and nothing may appear beside it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        result = outcome(lambda: read(path))
        assert list(Path(tmp).iterdir()) == [path], "the reader left a file behind"
        assert path.read_bytes() == data, "the reader rewrote its input"
    return result


# ---- strategies --------------------------------------------------------------------------------

# Characters that have broken text readers: NUL and C0 / C1 controls (U+0085 and U+009D as
# Windows-1252 round trips leave them), Unicode line separators, a BOM in the middle, a lone
# surrogate, and the separators the formats themselves use.
NASTY = [
    "\x00", "\x01", "\x0b", "\x0c", "\x1c", "\x1f", "\x7f", "\x80", "\x81", "\x85", "\x9d",
    "\x9f", "\xa0", "\u2028", "\u2029", "\ufeff", "\ufffd", "\ud800", "\r", "\n", "\t",
    "@", ",", ";", "|", '"', "'", "\\", "=", "{", "}", "[", "]", ":", "é", "€", "’", "—",
]  # fmt: skip
chars = st.one_of(st.characters(), st.sampled_from(NASTY))
texts = st.text(chars, max_size=60)
short_words = st.one_of(st.sampled_from(["", " ", "0", "1", "1.0", "-1", "true", "null"]), texts)
ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16"]


def encode(text: str, encoding: str) -> bytes:
    # a lone surrogate becomes the invalid UTF-8 it stands for; other encodings take "?" for
    # what they cannot write
    errors = "surrogatepass" if encoding.startswith("utf") else "replace"
    return text.encode(encoding, errors)


@st.composite
def encoded(draw: st.DrawFn, text: st.SearchStrategy[str]) -> bytes:
    """`text` in one encoding, or each line in its own (a file pasted together from two)."""
    value = draw(text)
    if draw(st.booleans()):
        return encode(value, draw(st.sampled_from(ENCODINGS)))
    lines = value.split("\n")
    return b"\n".join(encode(line, draw(st.sampled_from(ENCODINGS[:4]))) for line in lines)


def file_bytes(text: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Random bytes, or `text` encoded, maybe behind a BOM or stretched into a very long line."""
    long_line = st.builds(lambda b, n: b * n, st.sampled_from([b"a", b"x,", b"\xe9"]),
                          st.integers(1, 200_000))  # fmt: skip
    base = st.one_of(st.binary(max_size=300), encoded(text), long_line)
    return st.one_of(
        base,
        st.tuples(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe"]), base, base).map(
            lambda parts: b"".join(parts)
        ),
    )


labels = st.one_of(st.sampled_from([*FPB_LABELS, "Positive", " neutral ", ""]), texts)
fpb_text = st.lists(st.tuples(texts, st.sampled_from(["@", "@@", ""]), labels), max_size=8).map(
    lambda rows: "\n".join(f"{s}{at}{label}" for s, at, label in rows)
)
columns = st.one_of(st.sampled_from(["text", "label", "id", "Text", " text", ""]), texts)


@st.composite
def table_text(draw: st.DrawFn) -> str:
    """A delimited table: a header of plausible and odd column names, rows that may be ragged,
    written properly quoted or joined naively (stray quotes and all)."""
    delimiter = draw(st.sampled_from([",", ";", "|", "\t"]))
    header = draw(st.lists(columns, min_size=0, max_size=4))
    rows = draw(st.lists(st.lists(short_words, max_size=5), max_size=6))
    if draw(st.booleans()):
        out = io.StringIO()
        writer = csv.writer(out, delimiter=delimiter)
        writer.writerows([header, *rows])
        return out.getvalue()
    return "\n".join(delimiter.join(row) for row in [header, *rows])


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        texts,
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
json_rows = st.one_of(
    st.fixed_dictionaries({"text": json_values, "label": json_values}),
    st.dictionaries(columns, json_values, max_size=4),
    json_values,
)


@st.composite
def jsonl_text(draw: st.DrawFn) -> str:
    """JSON Lines: objects with odd values, values that are not objects, malformed lines."""
    lines = draw(st.lists(st.one_of(json_rows.map(json.dumps), texts, st.just("")), max_size=6))
    return "\n".join(lines)


json_list_text = st.lists(json_rows, max_size=6).map(json.dumps)

# Good inputs, so that the checks on a result run too: printable text with the readers' own
# separators in it, then maybe one nasty character put in anywhere.
plain = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1)
words = plain.filter(str.strip)


@st.composite
def spoiled(draw: st.DrawFn, clean: st.SearchStrategy[str]) -> str:
    text = draw(clean)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(NASTY)) + text[at:]
    return text


good_fpb = st.lists(st.tuples(words, st.sampled_from(FPB_LABELS)), min_size=1, max_size=6).map(
    lambda rows: "\n".join(f"{text}@{label}" for text, label in rows)
)
CODES = {"0": "negative", "1": "neutral", "2": "positive"}


@st.composite
def good_table(draw: st.DrawFn, fmt: str) -> tuple[str, str, dict[str, str] | None]:
    """A well-formed table of `fmt` (csv, tsv, jsonl, json), its text column and label map."""
    text_column = draw(st.sampled_from(["text", "headline", "Sentence text"]))
    label_map = draw(st.one_of(st.none(), st.just(CODES)))
    label = st.sampled_from(sorted(CODES) if label_map else FPB_LABELS)
    rows = draw(st.lists(st.tuples(words, label), min_size=1, max_size=5))
    if fmt in ("jsonl", "json"):
        records = [{"id": i, text_column: t, "label": lab} for i, (t, lab) in enumerate(rows)]
        if fmt == "json":
            return json.dumps(records, ensure_ascii=draw(st.booleans())), text_column, label_map
        return "\n".join(map(json.dumps, records)), text_column, label_map
    out = io.StringIO()
    delimiter = "\t" if fmt == "tsv" else draw(st.sampled_from([",", ";", "|"]))
    table = [["id", text_column, "label"], *([i, t, lab] for i, (t, lab) in enumerate(rows))]
    csv.writer(out, delimiter=delimiter).writerows(table)
    return out.getvalue(), text_column, label_map


@st.composite
def table_case(draw: st.DrawFn) -> tuple[str, bytes, str, dict[str, str] | None]:
    """(file name, its bytes, text column, label map): a good table maybe spoiled, or anything."""
    fmt = draw(st.sampled_from(["csv", "tsv", "jsonl", "json"]))
    if draw(st.booleans()):
        text, text_column, label_map = draw(good_table(fmt))
        return f"data.{fmt}", draw(encoded(spoiled(st.just(text)))), text_column, label_map
    data = draw(
        st.one_of(
            file_bytes(texts), encoded(table_text()), encoded(jsonl_text()), encoded(json_list_text)
        )
    )
    text_column = draw(st.sampled_from(["text", "Text", " text", "", "\u2028"]))
    return f"data.{fmt}", data, text_column, draw(st.one_of(st.none(), st.just(CODES)))


# Big integers: Python refuses to turn more than 4300 digits into an int (a ValueError that is no
# JSONDecodeError); deep nesting: the JSON decoder's RecursionError.
HUGE_INT = "1" * 5000
DEEP = "[" * 100_000


# ---- reading a file as text -----------------------------------------------------------------


@FAST
@given(file_bytes(texts))
@example(b"\xef\xbb\xbf")
@example("Stocks rose\u009d today\n".encode())
@example(b"\x00" * 10)
@example(b"\xff\xfe" + "x".encode("utf-16-le"))
def test_decode_text_gives_text_or_one_line(data: bytes) -> None:
    result = outcome(lambda: decode_text(data, "in.txt"))
    if isinstance(result, str):
        assert result.strip()
        assert "\x00" not in result


def test_utf8_c1_controls_from_windows_1252_round_trips_are_read(tmp_path: Path) -> None:
    # U+009D and U+0081 are what cp1252 leaves undefined, written back as UTF-8: the Twitter
    # Financial News set holds 31 such characters, and its texts are good all the same. They
    # are read, and dropped from the texts (what they stood for is lost).
    path = tmp_path / "news.csv"
    path.write_bytes('text,label\n"Sales rose,\u009d she said",0\nRev\u0081 up,1\n'.encode())
    examples = load_table(path, label_map={"0": "negative", "1": "positive"})
    assert [e.text for e in examples] == ["Sales rose, she said", "Rev up"]
    assert [e.repaired for e in examples] == [True, True]
    assert read_text(path).count("\u009d") == 1


# ---- Financial PhraseBank -------------------------------------------------------------------


def check_examples(examples: list[Example], allowed: tuple[str, ...] | list[str] | None) -> None:
    assert examples
    for e in examples:
        assert e.text and e.text == e.text.strip()
        assert allowed is None or e.label in allowed
        assert ":" in e.source


@FAST
@given(st.one_of(file_bytes(fpb_text), encoded(fpb_text), encoded(spoiled(good_fpb))))
@example(b"Sales rose@positive\n")
@example(b"Sales rose@pos\ritive\n")
@example("Sales rose@posit\u2028ive\n".encode())
@example("Sales rose@posit\u0085ive\n".encode())
def test_fpb_file_gives_examples_or_one_line(data: bytes) -> None:
    result = read_file("Sentences_AllAgree.txt", data, load_fpb)
    if not isinstance(result, FinloraError) and result:
        check_examples(result, FPB_LABELS)


# ---- tables -----------------------------------------------------------------------------------


@SLOW
@given(table_case())
@example(("data.csv", b'text,label\n"Sales rose",positive\n', "text", None))
@example(("data.csv", b'te"xt,label\nSales,positive\n', "text", None))
@example(("data.csv", b'text,"la\nbel"\nSales,positive\n', "text", None))
@example(("data.jsonl", b'{"text": "Sales", "label": 1}\n', "text", {"0": "negative"}))
@example(("data.jsonl", f'{{"text": "Sales", "label": {HUGE_INT}}}\n'.encode(), "text", None))
@example(("data.json", f'[{{"text": "Sales", "label": {HUGE_INT}}}]'.encode(), "text", None))
@example(("data.jsonl", DEEP.encode(), "text", None))
@example(("data.json", ("[" + DEEP).encode(), "text", None))
@example(("data.jsonl", b'{"te\\nxt": "Sales", "label": "positive"}\n', "text", None))
@example(("data.jsonl", b'{"text": "Sales", "label": "posi\\u2028tive"}\n', "text", None))
@example(("data.csv", b"text,label\n" + b"a" * 200_000 + b",positive\n", "text", None))
def test_table_gives_examples_or_one_line(
    case: tuple[str, bytes, str, dict[str, str] | None],
) -> None:
    name, data, text_column, label_map = case
    allowed = list(FPB_LABELS)

    def read(path: Path) -> list[Example]:
        return load_examples(path, text_column=text_column, label_map=label_map, labels=allowed)

    result = read_file(name, data, read)
    if not isinstance(result, FinloraError):
        check_examples(result, allowed)


@FAST
@given(
    st.sampled_from(["in.csv", "in.tsv", "in.jsonl", "in.json", "in.txt", "standard input"]),
    st.one_of(texts, table_text(), jsonl_text(), json_list_text),
)
@example("in.jsonl", DEEP)
@example("in.json", f'[{{"text": {HUGE_INT}}}]')
def test_unlabelled_texts_are_texts_or_one_line(name: str, text: str) -> None:
    result = outcome(lambda: load_texts(name, text))
    if not isinstance(result, FinloraError):
        assert all(isinstance(t, str) and t and t == t.strip() for t in result)


# ---- label maps -------------------------------------------------------------------------------


map_words = st.text(
    st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"), exclude_characters=",="), min_size=1
).filter(str.strip)
good_label_maps = st.dictionaries(map_words, map_words, min_size=1, max_size=4).map(
    lambda mapping: ",".join(f"{raw}={label}" for raw, label in mapping.items())
)  # fmt: skip


@FAST
@given(
    st.one_of(
        st.text(st.one_of(chars, st.sampled_from(list("=,=, 0123"))), max_size=40),
        spoiled(good_label_maps),
    )
)
@example("0=negative,1=neutral,2=positive")
@example("0=neg\native")
@example("0=a,\u2028=b")
def test_label_map_parses_back_or_says_one_line(spec: str) -> None:
    result = outcome(lambda: parse_label_map(spec))
    if not isinstance(result, FinloraError):
        assert result and all(k and v and "," not in k + v for k, v in result.items())
        assert parse_label_map(",".join(f"{k}={v}" for k, v in result.items())) == result


# ---- --set items ----------------------------------------------------------------------------

KEYS = ["seed", "task", "model.name", "model.kind", "data.format", "data.path", "data.label_map",
        "data.labels", "data.test_fraction", "data.agreement", "data.template", "method.name",
        "lora.r", "lora.target_modules", "train.epochs", "train.batch_size", "train.device",
        "train.learning_rate", "train.precision", "train.compile", "speed.threads",
        "speed.max_batch_tokens", "prefix.num_virtual_tokens", "train", "data", "", "a..b",
        "lora.r.x", "Train.epochs"]  # fmt: skip
# YAML that has surprised readers: dates, sets, tags, anchors, big numbers, non-finite floats.
VALUES = ["", "3", "-1", "0", "1e-4", "1e400", ".nan", "-.inf", "true", "null", "~", "[1, 2",
          "[a, b]", "{a: 1}", "2020-01-01", "!!binary aGk=", "!!set {a}", "&a [*a]", "0x1f",
          "0o17", "1_000", "'quoted", "a: b: c", "- a", "|", "%YAML 1.1"]  # fmt: skip
GOOD_ITEMS = ["seed=7", "train.epochs=2", "lora.r=16", "method.name=ia3", "method.name=prefix",
              "train.device=cpu", "train.learning_rate=1e-4", "data.test_fraction=0.2",
              "data.label_map=0=negative,1=positive", "data.labels=[a, b]", "task=instruct",
              "speed.max_batch_tokens=auto", "train.precision=bf16", "data.format=csv"]  # fmt: skip


# Keys and values may hold line breaks, huge integers or deep nesting: each must end in one line.
set_items = st.one_of(
    st.sampled_from(GOOD_ITEMS),
    st.tuples(
        st.one_of(st.sampled_from(KEYS), texts), st.one_of(st.sampled_from(VALUES), texts)
    ).map(lambda kv: f"{kv[0]}={kv[1]}"),
    texts,
)


@SLOW
@given(st.lists(set_items, min_size=1, max_size=4))
@example(["seed=1"])
@example(["train=3", "train.epochs=2"])
@example(["seed=2020-01-01", "train.epochs=!!binary aGk="])
@example([f"seed={HUGE_INT}"])
@example(["seed=" + "[" * 2000])
@example(["se\ned=1"])
def test_set_items_give_a_config_or_one_line(overrides: list[str]) -> None:
    result = outcome(lambda: load_config(None, overrides))
    if not isinstance(result, FinloraError):
        assert isinstance(result, RunConfig)
        assert outcome(lambda: load_config(None, overrides)) == result  # the same every time


# ---- prompt templates -------------------------------------------------------------------------

placeholders = st.sampled_from(["{text}", "{labels}", "{instruction}", "{input}", "{", "}"])
template_strings = st.lists(st.one_of(texts, placeholders), max_size=5).map("".join)
template_values = st.one_of(template_strings, json_values)
TEMPLATE_KEYS = ["prompt", "label_prefix", "description", "prompt_input", "prompt_no_input"]
template_objects = st.dictionaries(
    st.one_of(st.sampled_from(TEMPLATE_KEYS), texts), template_values, max_size=6
)
good_templates = st.fixed_dictionaries(
    {"prompt": st.tuples(plain, plain).map("{text}".join)},
    optional={"label_prefix": plain, "description": plain, "prompt_input": st.just(
        "{instruction} {input}"), "prompt_no_input": st.just("{instruction}")},
)  # fmt: skip
template_files = st.one_of(
    encoded(spoiled(good_templates.map(json.dumps))),
    template_objects.map(json.dumps).map(str.encode),
    st.lists(template_values, max_size=3).map(json.dumps).map(str.encode),
    json_values.map(json.dumps).map(str.encode),
    file_bytes(template_strings),
)


def check_prompt_template(template: PromptTemplate, text: str) -> None:
    assert isinstance(template.prompt, str) and "{text}" in template.prompt
    assert isinstance(template.label_prefix, str) and isinstance(template.description, str)
    before, after = template.parts(["negative", text])
    assert isinstance(before, str) and isinstance(after, str)
    assert template.verbalize(text).endswith(text)


def check_instruct_template(template: InstructTemplate, text: str) -> None:
    assert isinstance(template.prompt_input, str) and isinstance(template.prompt_no_input, str)
    assert isinstance(template.description, str)
    assert isinstance(template.prompt(text, text), str)
    assert isinstance(template.prompt(text), str)


@SLOW
@given(template_files, texts)
@example(b'{"prompt": "News: {text}\\nSentiment ({labels}):", "label_prefix": " "}', "x")
@example(b'{"prompt": ["{text}"]}', "x")
@example(b'{"prompt": "{text}", "label_prefix": 1}', "x")
@example(b'{"prompt": "{text}", "description": ["a"]}', "x")
@example(b'{"prompt_input": ["{instruction}", "{input}"], "prompt_no_input": ""}', "x")
@example(b'{"prompt_input": "{instruction}{input}", "description": 7}', "x")
@example('{"prompt": "{text} é"}'.encode("latin-1"), "x")
@example(b"\xef\xbb\xbf{}", "x")
@example(DEEP.encode(), "x")
@example(f'{{"prompt": "{{text}}", "n": {HUGE_INT}}}'.encode(), "x")
def test_template_file_gives_a_template_or_one_line(data: bytes, text: str) -> None:
    template = read_file("mine.json", data, PromptTemplate.load)
    if not isinstance(template, FinloraError):
        check_prompt_template(template, text)
    instruct = read_file("mine.json", data, InstructTemplate.load)
    if not isinstance(instruct, FinloraError):
        check_instruct_template(instruct, text)


# Names without line breaks or "/": shipped templates are looked up by name; a path is a file.
names = st.text(st.characters(exclude_categories=("Cc", "Zl", "Zp", "Cs"), exclude_characters="/"),
                max_size=20)  # fmt: skip


@FAST
@given(st.one_of(st.sampled_from(["sentiment", "alpaca", "chat", "", ".", "..", "x.json"]), names))
def test_template_name_gives_a_template_or_one_line(name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # relative names resolve against an empty directory, never the test's own
        template = outcome(lambda: _in_dir(Path(tmp), lambda: PromptTemplate.load(name)))
        instruct = outcome(lambda: _in_dir(Path(tmp), lambda: InstructTemplate.load(name)))
        assert not any(Path(tmp).iterdir())
    if not isinstance(template, FinloraError):
        check_prompt_template(template, "x")
    if not isinstance(instruct, FinloraError):
        check_instruct_template(instruct, "x")


def _in_dir(directory: Path, call: Callable[[], T]) -> T:
    before = Path.cwd()
    os.chdir(directory)
    try:
        return call()
    finally:
        os.chdir(before)


@FAST
@given(template_strings, texts, texts)
def test_instruct_prompt_fills_any_text(template: str, instruction: str, input_text: str) -> None:
    filled = InstructTemplate("mine", template, template).prompt(instruction, input_text)
    # user text is put in as it is: braces and placeholders in it are never filled again
    assert filled.count(instruction) >= template.count("{instruction}") or not instruction
    assert isinstance(filled, str)
