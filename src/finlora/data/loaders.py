"""Loaders: Financial PhraseBank, tables (CSV / TSV / JSON Lines, Parquet, Excel, `datasets`
directories), and one dispatching entry point; the rows `finlora predict` labels.

Every loader returns `Example`s with canonical labels and a "file:line" source, and turns every
problem in the file into a one-line `FinloraError` naming the file and line. Text marked by a
wrong decode (mojibake, C1 controls) is repaired (`textfile.repair`) and the example flagged, for
`repair_note`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finlora.data.examples import Example
from finlora.data.tables import (
    SUFFIX_FORMATS,
    TABLE_FORMATS,
    TEXT_READERS,
    csv_delimiter,
    dataset_files,
    is_dataset_dir,
    table_rows,
)
from finlora.data.textfile import printable, read_text, repair
from finlora.errors import FinloraError

if TYPE_CHECKING:
    from finlora.config.sections import DataConfig, DataSource

__all__ = [
    "FPB_FILES",
    "FPB_LABELS",
    "InputRows",
    "files_read",
    "format_for",
    "load_examples",
    "load_fpb",
    "load_inputs",
    "load_table",
    "load_texts",
    "parse_label_map",
    "read_text",
    "reads_as_fpb",
    "repair_note",
    "run_reading",
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
    return _fpb_examples(path, read_text(path))


def _fpb_examples(name: Path | str, text: str) -> list[Example]:
    examples = []
    for number, raw in _lines(text):
        line = repair(raw)
        if not line.strip():
            continue
        where = f"{name}:{number}"
        # split on the last '@': sentences themselves may contain '@'
        sentence, sep, label = line.rpartition("@")
        if not sep:
            raise FinloraError(f"{where}: no '@' label separator")
        label = label.strip()
        if label not in FPB_LABELS:
            raise FinloraError(f"{where}: {_unknown_label(label, FPB_LABELS)}")
        if not sentence.strip():
            raise FinloraError(f"{where}: empty sentence before '@{label}'")
        examples.append(Example(sentence.strip(), label, where, repaired=line != raw))
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


def _cell(where: str, column: str, value: Any) -> str:
    if isinstance(value, dict | list):
        raise FinloraError(f"{where}: column '{printable(column)}' holds a {type(value).__name__}")
    # JSON labels are often ints (0, 1, 2), floats from a pandas export (1.0) or booleans;
    # label maps and label sets are strings, written as people write them ("1", "true").
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float) and value != value:
        return ""  # NaN: how pandas writes an empty cell into Parquet
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
    examples = []
    for number, row in table_rows(path, fmt, (text_column, label_column)):
        where = f"{path}:{number}"
        cells = (_cell(where, text_column, row.get(text_column)),
                 _cell(where, label_column, row.get(label_column)))  # fmt: skip
        text, raw = (repair(c).strip() for c in cells)
        if not text:
            raise FinloraError(f"{where}: empty text in column '{printable(text_column)}'")
        if not raw:
            raise FinloraError(f"{where}: missing label in column '{printable(label_column)}'")
        label = _canonical_label(where, raw, label_map, labels)
        examples.append(Example(text, label, where, repaired=(text, raw) != cells))
    return examples


def load_table(
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    label_map: dict[str, str] | None = None,
    labels: Sequence[str] | None = None,
) -> list[Example]:
    """Load a table of examples: CSV (.csv), TSV (.tsv), JSON Lines (.jsonl / .json), Parquet
    (.parquet), an Excel workbook (.xlsx) or a `datasets` directory (`save_to_disk`).

    Labels are stringified and stripped, mapped through `label_map` when given (a raw value not
    in it is an error), then checked against `labels` when given. Raises FinloraError on a
    missing column, malformed row, empty text, missing or unknown label, naming file and line.
    """
    path = Path(path)
    fmt = "hf" if is_dataset_dir(path) else SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt not in TABLE_FORMATS:
        allowed = ", ".join(s for s, f in SUFFIX_FORMATS.items() if f in TABLE_FORMATS)
        raise FinloraError(
            f"{path}: cannot tell the table format from suffix '{path.suffix}' "
            f"(expected one of {allowed})"
        )
    return _load_table_as(fmt, path, text_column, label_column, label_map, labels)


_LOADERS: dict[str, Callable[..., list[Example]]] = {
    "fpb": load_fpb,
    **{fmt: partial(_load_table_as, fmt) for fmt in TABLE_FORMATS},
}


def _named_format(path: Path) -> str | None:
    """The format `path` says it is in: a `datasets` directory, or a table suffix (.txt names
    none: it holds Financial PhraseBank, plain lines or any table)."""
    if is_dataset_dir(path):
        return "hf"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    return fmt if fmt in TABLE_FORMATS and not path.is_dir() else None


def _detect_format(path: Path) -> str:
    named = _named_format(path)
    if named is not None:
        return named
    if path.is_dir():
        return "fpb"
    if not path.exists():
        raise FinloraError(f"{path}: no such file")
    if path.suffix.lower() == ".txt":
        return "fpb"
    raise FinloraError(
        f"{path}: cannot tell the format from suffix '{path.suffix}' "
        f"(name one of {', '.join(_LOADERS)})"
    )


def format_for(path: Path, run: DataConfig | DataSource) -> str:
    """The format to read `path` in when the user names none: what its suffix says (or a
    `datasets` directory), else the format `run` (`run_reading`) read its own data in (a run
    trained on a TSV saved as .txt reads another .txt so), else "auto"."""
    named = _named_format(Path(path))
    if named is not None:
        return named
    fmt = run.format
    if fmt == "auto" and run.path:
        fmt = _named_format(Path(run.path).expanduser()) or "auto"
    return fmt if fmt in _LOADERS else "auto"


def reads_as_fpb(path: Path, fmt: str) -> bool:
    """Whether `path` read in format `fmt` is Financial PhraseBank (a directory or .txt file
    under "auto", unless it is a `datasets` directory)."""
    path = Path(path)
    auto_fpb = _named_format(path) is None and (path.is_dir() or path.suffix.lower() == ".txt")
    return fmt == "fpb" or (fmt == "auto" and auto_fpb)


def files_read(path: Path, fmt: str, agreement: str) -> list[Path]:
    """The files a loader reads for `path`: a Financial PhraseBank directory's agreement file,
    a `datasets` directory's Arrow files, else `path` itself."""
    path = Path(path)
    if fmt == "hf" or (fmt == "auto" and is_dataset_dir(path)):
        return dataset_files(path)
    if path.is_dir():
        return [path / FPB_FILES[agreement]]
    return [path]


def run_reading(data: DataConfig, path: Path) -> DataConfig | DataSource:
    """What in a run's data section says how to read `path` as the run read its own data:
    the section itself, or with data.sources the source that is `path`, else the first source
    whose file has `path`'s format, else the first."""
    if not data.sources:
        return data
    target = Path(path).expanduser().resolve()
    for source in data.sources:
        if Path(source.path).expanduser().resolve() == target:
            return source
    fmt = _named_format(Path(path))
    same = [s for s in data.sources if fmt and _named_format(Path(s.path)) == fmt]
    return (same or data.sources)[0]


def load_examples(path: Path, fmt: str = "auto", **options: Any) -> list[Example]:
    """Load examples from `path` in format `fmt` ("auto", "fpb", "csv", "tsv", "jsonl",
    "parquet", "xlsx", "hf").

    "auto" picks by suffix (.txt or a directory -> fpb; a directory with a dataset_info.json ->
    hf). `options` go to the loader (`agreement` for fpb; `text_column`, `label_column`,
    `label_map`, `labels` for tables). Raises FinloraError on an unknown format, any loader
    error, or a file with no examples.
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


def _repaired_note(repaired: Sequence[str], total: int) -> str | None:
    if not repaired:
        return None
    return (
        f"repaired mis-decoded characters (C1 controls, mojibake) in {len(repaired)} of "
        f"{total} rows, the first at {repaired[0]}"
    )


def repair_note(examples: Sequence[Example]) -> str | None:
    """One line on the examples whose text `textfile.repair` changed: how many, and where the
    first is; None when there are none."""
    return _repaired_note([e.source for e in examples if e.repaired], len(examples))


@dataclass
class InputRows:
    """Rows to label (`finlora predict`): each row's cells as read, with its text, and its true
    label where the file has a label column; how a CSV was written, to write one back alike."""

    columns: list[str]  # every column, in order; ["text"] for plain lines
    rows: list[dict[str, Any]]
    texts: list[str]  # repaired and stripped
    sources: list[str]  # "file:line" of each row
    labels: list[str] | None = None  # None: the file has no label column
    repaired: list[str] = field(default_factory=list)  # sources of rows `repair` changed
    skipped: list[str] = field(default_factory=list)  # sources of rows without text
    delimiter: str = ","

    def notes(self) -> list[str]:
        """What reading the rows changed or left out, one line each."""
        notes = [_repaired_note(self.repaired, len(self.rows))]
        if self.skipped:
            notes.append(f"{len(self.skipped)} row(s) without text skipped, the first at "
                         f"{self.skipped[0]}")  # fmt: skip
        return [n for n in notes if n]


def _plain_lines(name: Path | str, text: str) -> InputRows:
    table = InputRows(["text"], [], [], [])
    for number, raw in _lines(text):
        line = repair(raw).strip()
        if line:
            table.rows.append({"text": line})
            table.texts.append(line)
            table.sources.append(f"{name}:{number}")
            if line != raw.strip():
                table.repaired.append(table.sources[-1])
    return table


def load_inputs(
    name: Path | str,
    text: str | None = None,
    fmt: str = "auto",
    *,
    text_column: str = "text",
    label_column: str | None = None,
    label_map: dict[str, str] | None = None,
) -> InputRows:
    """The rows of unlabelled (or labelled) data to predict on, as `predict --file` reads it.

    `name` is the file's path or "standard input" (`text`: its text, already read; None: read
    the file). "auto" takes a table by its suffix (read as training reads tables: ";"-split
    CSVs, a .json list), else one text a line; "fpb" reads `sentence@label` lines. The
    `label_column`, where the table has it, gives the true labels, mapped through `label_map`
    (values the map lacks are kept as written).
    """
    path = Path(name)
    if fmt == "auto":
        fmt = _named_format(path) or "lines"
    if fmt == "lines":
        return _plain_lines(name, read_text(path) if text is None else text)
    if fmt == "fpb":
        examples = load_fpb(path) if text is None else _fpb_examples(name, text)
        rows = [{"text": e.text, "label": e.label} for e in examples]
        return InputRows(["text", "label"], rows, [e.text for e in examples],
                         [e.source for e in examples], [e.label for e in examples],
                         [e.source for e in examples if e.repaired])  # fmt: skip
    if fmt not in TABLE_FORMATS:
        raise FinloraError(
            f"unknown data format '{fmt}' (expected one of auto, fpb, {', '.join(TABLE_FORMATS)})"
        )
    if text is None and fmt in TEXT_READERS:
        text = read_text(path)  # read here: a CSV's delimiter is written back alike
    return _table_inputs(path, fmt, text, text_column, label_column, label_map)


def _table_inputs(
    path: Path,
    fmt: str,
    text: str | None,
    text_column: str,
    label_column: str | None,
    label_map: dict[str, str] | None,
) -> InputRows:
    delimiter = "\t" if fmt == "tsv" else ","
    if fmt == "csv" and text is not None:
        delimiter = csv_delimiter(text, (text_column,))
    table = InputRows([], [], [], [], delimiter=delimiter)
    labels: list[str] = []
    for number, row in table_rows(path, fmt, (text_column,), text):
        where = f"{path}:{number}"
        value = _cell(where, text_column, row.get(text_column))
        cleaned = repair(value).strip()
        if not cleaned:
            table.skipped.append(where)
            continue
        table.columns += [c for c in row if c not in table.columns]
        table.rows.append(row)
        table.texts.append(cleaned)
        table.sources.append(where)
        if cleaned != value:
            table.repaired.append(where)
        if label_column is not None:
            raw = repair(_cell(where, label_column, row.get(label_column))).strip()
            labels.append(label_map.get(raw, raw) if label_map else raw)
    if label_column is not None and label_column in table.columns:
        table.labels = labels
    return table


def load_texts(name: Path | str, text: str, text_column: str = "text") -> list[str]:
    """The non-blank texts of unlabelled data (`load_inputs` on text already read)."""
    return load_inputs(name, text, text_column=text_column).texts
