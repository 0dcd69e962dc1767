"""Loaders: Financial PhraseBank, CSV / TSV / JSON Lines tables, and one dispatching entry point.

Every loader returns `Example`s with canonical labels and a "file:line" source, and turns every
problem in the file into a one-line `FinloraError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from finlora.data.examples import Example
from finlora.data.textfile import json_array, json_lines, printable, read_text
from finlora.errors import FinloraError

__all__ = [
    "FPB_FILES",
    "FPB_LABELS",
    "load_examples",
    "load_fpb",
    "load_table",
    "load_texts",
    "parse_label_map",
    "read_text",
]

FPB_LABELS = ("negative", "neutral", "positive")
FPB_FILES = {
    "all": "Sentences_AllAgree.txt",
    "75": "Sentences_75Agree.txt",
    "66": "Sentences_66Agree.txt",
    "50": "Sentences_50Agree.txt",
}


def _lines(text: str) -> Iterator[tuple[int, str]]:
    # split on "\n" only: str.splitlines also breaks on U+2028, form feeds etc., which would
    # make line numbers disagree with what an editor shows.
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.rstrip("\r")


def load_fpb(path: Path, agreement: str = "all") -> list[Example]:
    """Load Financial PhraseBank v1.0 (`sentence@label` per line).

    `path` is one Sentences_*.txt file or the FPB directory, in which case `agreement`
    ("all", "75", "66", "50") picks the file. Raises FinloraError on an unknown agreement, a line
    without '@', or a label outside FPB_LABELS.
    """
    if agreement not in FPB_FILES:
        allowed = ", ".join(FPB_FILES)
        raise FinloraError(f"unknown FPB agreement '{agreement}' (expected one of {allowed})")
    path = Path(path)
    if path.is_dir():
        if not (path / FPB_FILES[agreement]).is_file():
            raise FinloraError(
                f"{path}: no {FPB_FILES[agreement]} here; a directory is read as Financial "
                "PhraseBank (name a CSV, TSV or JSON Lines file for other data)"
            )
        path = path / FPB_FILES[agreement]
    examples = []
    for number, line in _lines(read_text(path)):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        # split on the last '@': sentences themselves may contain '@'
        sentence, sep, label = line.rpartition("@")
        if not sep:
            raise FinloraError(f"{where}: no '@' label separator")
        label = label.strip()
        if label not in FPB_LABELS:
            raise FinloraError(f"{where}: {_unknown_label(label, FPB_LABELS)}")
        if not sentence.strip():
            raise FinloraError(f"{where}: empty sentence before '@{label}'")
        examples.append(Example(sentence.strip(), label, where))
    return examples


def parse_label_map(spec: str) -> dict[str, str]:
    """Parse "0=negative,1=positive" into {"0": "negative", "1": "positive"}.

    Raises FinloraError naming the malformed or repeated entry.
    """
    mapping: dict[str, str] = {}
    for piece in spec.split(","):
        raw, sep, label = (part.strip() for part in piece.partition("="))
        if not (sep and raw and label):
            raise FinloraError(
                f"label map '{printable(spec)}': bad entry '{printable(piece.strip())}' "
                "(expected raw=label, e.g. 0=negative)"
            )
        if raw in mapping:
            raise FinloraError(f"label map '{printable(spec)}': '{printable(raw)}' is mapped twice")
        mapping[raw] = label
    return mapping


# A table reader yields (line number, row) pairs, rows as {column: value}; it checks the columns.
_Rows = Iterator[tuple[int, dict[str, Any]]]


def _csv_delimiter(text: str, columns: Sequence[str]) -> str:
    """ "," unless the header names the columns only when split at ";", "|" or a tab:
    spreadsheets set to a European locale write ";" (the decimal comma) into files they still
    call .csv, and tab-separated exports are often saved as .csv too."""
    header = text.split("\n", 1)[0]
    for delimiter in (",", ";", "|", "\t"):
        if all(c in (name.strip().strip('"') for name in header.split(delimiter)) for c in columns):
            return delimiter
    return ","


def _delimited_rows(
    path: Path, text: str, columns: Sequence[str], delimiter: str | None = None
) -> _Rows:
    """A CSV (`delimiter` None: ",", or ";", "|" or a tab where the header says so) or TSV
    table."""
    delimiter = delimiter or _csv_delimiter(text, columns)
    # strict: a stray quote ('"Sales rose,positive') is an error at its line, not a field that
    # silently swallows the rows after it.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1  # the line the row being read starts on: where a stray quote would be
    try:
        # no row at all (text read elsewhere may be empty): no columns, so a missing one
        header = [name.strip() for name in next(reader, [])]
        _check_columns(path, columns, header)
        repeated = sorted({c for c in columns if header.count(c) > 1})
        if repeated:
            raise FinloraError(
                f"{path}:1: column '{printable(repeated[0])}' appears more than once"
            )
        start = reader.line_num + 1
        for cells in reader:
            if cells and any(cell.strip() for cell in cells):
                if len(cells) > len(header):
                    raise FinloraError(
                        f"{path}:{start}: {len(cells)} fields but the header has {len(header)}"
                    )
                yield start, dict(zip(header, cells, strict=False))
            start = reader.line_num + 1
    except csv.Error as err:
        raise FinloraError(
            f"{path}:{start}: malformed {delimiter!r} table in the row from this line ({err})"
        ) from None


def _jsonl_rows(path: Path, text: str, columns: Sequence[str]) -> _Rows:
    """JSON Lines; a .json file may instead hold one list of objects."""
    is_list = path.suffix.lower() == ".json" and text.lstrip().startswith("[")
    for number, row in json_array(path, text) if is_list else json_lines(path, text):
        if not isinstance(row, dict):
            raise FinloraError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        _check_columns(f"{path}:{number}", columns, list(row))
        yield number, row


def _check_columns(where: object, wanted: Sequence[str], present: Sequence[str]) -> None:
    for column in wanted:
        if column not in present:
            found = printable(", ".join(present))
            raise FinloraError(f"{where}: no column '{printable(column)}' (columns: {found})")


_TABLE_READERS: dict[str, Callable[[Path, str, Sequence[str]], _Rows]] = {
    "csv": _delimited_rows,
    "tsv": partial(_delimited_rows, delimiter="\t"),
    "jsonl": _jsonl_rows,
}
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "fpb"}


def _cell(where: str, column: str, value: Any) -> str:
    if isinstance(value, dict | list):
        raise FinloraError(f"{where}: column '{printable(column)}' holds a {type(value).__name__}")
    # JSON labels are often ints (0, 1, 2), floats from a pandas export (1.0) or booleans;
    # label maps and label sets are strings, written as people write them ("1", "true").
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = "" if value is None else str(value).strip()
    return text.lower() if text.lower() in ("true", "false") else text  # pandas writes True


def _unknown_label(label: str, allowed: Sequence[str]) -> str:
    return f"unknown label '{printable(label)}' (expected one of {printable(', '.join(allowed))})"


def _canonical_label(
    where: str,
    raw: str,
    label_map: dict[str, str] | None,
    labels: Sequence[str] | None,
) -> str:
    label = raw
    if label_map is not None:
        whole = re.fullmatch(r"(-?\d+)\.0+", raw)  # "1.0" in a CSV from pandas is label 1
        if raw not in label_map and whole and whole.group(1) in label_map:
            raw = whole.group(1)
        if raw not in label_map:
            raise FinloraError(f"{where}: {_unknown_label(raw, list(label_map))}")
        label = label_map[raw]
    if labels is not None and label not in labels:
        raise FinloraError(f"{where}: {_unknown_label(label, labels)}")
    return label


def _load_table_as(
    fmt: str,
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    label_map: dict[str, str] | None = None,
    labels: Sequence[str] | None = None,
) -> list[Example]:
    path = Path(path)
    rows = _TABLE_READERS[fmt](path, read_text(path), (text_column, label_column))
    examples = []
    for number, row in rows:
        where = f"{path}:{number}"
        text = _cell(where, text_column, row.get(text_column))
        raw = _cell(where, label_column, row.get(label_column))
        if not text:
            raise FinloraError(f"{where}: empty text in column '{printable(text_column)}'")
        if not raw:
            raise FinloraError(f"{where}: missing label in column '{printable(label_column)}'")
        examples.append(Example(text, _canonical_label(where, raw, label_map, labels), where))
    return examples


def load_table(
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    label_map: dict[str, str] | None = None,
    labels: Sequence[str] | None = None,
) -> list[Example]:
    """Load a CSV (.csv), TSV (.tsv) or JSON Lines (.jsonl / .json) table of examples.

    Labels are stringified and stripped, mapped through `label_map` when given (a raw value not
    in it is an error), then checked against `labels` when given. Raises FinloraError on a
    missing column, malformed row, empty text, missing or unknown label, naming file and line.
    """
    path = Path(path)
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt not in _TABLE_READERS:
        allowed = ", ".join(s for s, f in _SUFFIX_FORMATS.items() if f in _TABLE_READERS)
        raise FinloraError(
            f"{path}: cannot tell the table format from suffix '{path.suffix}' "
            f"(expected one of {allowed})"
        )
    return _load_table_as(fmt, path, text_column, label_column, label_map, labels)


def load_texts(name: Path | str, text: str, text_column: str = "text") -> list[str]:
    """The non-blank texts of unlabelled data, as `predict --file` reads it: a table's
    `text_column` (read as training reads tables: ";"-split CSVs, a .json list), else one text
    a line. `name` is the file's path (its suffix says which) or "standard input"."""
    path = Path(name)
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt not in _TABLE_READERS:
        return [line.strip() for line in text.splitlines() if line.strip()]
    texts = []
    for number, row in _TABLE_READERS[fmt](path, text, (text_column,)):
        value = row.get(text_column)
        if value is not None and not isinstance(value, str):
            raise FinloraError(f"{path}:{number}: column '{printable(text_column)}' is not text")
        if value and value.strip():
            texts.append(value.strip())
    return texts


_LOADERS: dict[str, Callable[..., list[Example]]] = {
    "fpb": load_fpb,
    **{fmt: partial(_load_table_as, fmt) for fmt in _TABLE_READERS},
}


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "fpb"
    if not path.exists():
        raise FinloraError(f"{path}: no such file")
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FinloraError(
            f"{path}: cannot tell the format from suffix '{path.suffix}' "
            f"(name one of {', '.join(_LOADERS)})"
        )
    return fmt


def load_examples(path: Path, fmt: str = "auto", **options: Any) -> list[Example]:
    """Load examples from `path` in format `fmt` ("auto", "fpb", "csv", "tsv", "jsonl").

    "auto" picks by suffix (.txt or a directory -> fpb). `options` go to the loader
    (`agreement` for fpb; `text_column`, `label_column`, `label_map`, `labels` for tables).
    Raises FinloraError on an unknown format, any loader error, or a file with no examples.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = _detect_format(path)
    if fmt not in _LOADERS:
        raise FinloraError(
            f"unknown data format '{fmt}' (expected one of auto, {', '.join(_LOADERS)})"
        )
    examples = _LOADERS[fmt](path, **options)
    if not examples:
        raise FinloraError(f"{path}: no examples")
    return examples
