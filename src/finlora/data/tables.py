"""Table readers: each yields a file's rows as (line, {column: value}) after checking that the
columns asked for are there.

CSV, TSV and JSON Lines are read from their text (`textfile.read_text` decides the encoding);
Parquet, Excel workbooks and `datasets` directories (`Dataset.save_to_disk`) through pyarrow,
openpyxl and `datasets`, imported only when such a file is read. The "line" of a row is the line
it starts on in a text file, its row number in an Excel sheet, and its position (from 1) in a
Parquet file or a `datasets` directory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from finlora.data.textfile import json_array, json_lines, printable, read_text
from finlora.errors import FinloraError

Rows = Iterator[tuple[int, dict[str, Any]]]

SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".xlsx": "xlsx",
    ".txt": "fpb",
}
# What `Dataset.save_to_disk` writes beside the data (a DatasetDict: dataset_dict.json).
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json")


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in DATASET_MARKERS)


def dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a `datasets` directory, as its state.json lists them (what its data
    is; the other files describe it)."""
    import json

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return [path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(path.glob("*.arrow")) or [path / "dataset_info.json"]


def check_columns(where: object, wanted: Sequence[str], present: Sequence[str]) -> None:
    """Raise FinloraError for the first of `wanted` not in `present`; a name that is wrong only
    in case ("headline" for "Headline") gets the right one named."""
    for column in wanted:
        if column in present:
            continue
        found = printable(", ".join(map(str, present)))
        message = f"{where}: no column '{printable(column)}' (columns: {found})"
        same = [p for p in present if str(p).casefold() == column.casefold()]
        if same:
            message += f"; did you mean '{printable(str(same[0]))}'?"
        raise FinloraError(message)


def _check_header(path: Path, columns: Sequence[str], header: Sequence[str]) -> None:
    check_columns(path, columns, header)
    repeated = sorted({c for c in columns if list(header).count(c) > 1})
    if repeated:
        raise FinloraError(f"{path}:1: column '{printable(repeated[0])}' appears more than once")


def csv_delimiter(text: str, columns: Sequence[str]) -> str:
    """ "," unless the header names the columns only when split at ";", "|" or a tab:
    spreadsheets set to a European locale write ";" (the decimal comma) into files they still
    call .csv, and tab-separated exports are often saved as .csv too. Names are matched in any
    case, so that a column named in the wrong case is reported as such."""
    header = text.split("\n", 1)[0].casefold()
    wanted = [c.casefold() for c in columns]
    for delimiter in (",", ";", "|", "\t"):
        names = {name.strip().strip('"') for name in header.split(delimiter)}
        if all(c in names for c in wanted):
            return delimiter
    return ","


def delimited_rows(
    path: Path, text: str, columns: Sequence[str], delimiter: str | None = None
) -> Rows:
    """A CSV (`delimiter` None: ",", or ";", "|" or a tab where the header says so) or TSV
    table."""
    delimiter = delimiter or csv_delimiter(text, columns)
    # strict: a stray quote ('"Sales rose,positive') is an error at its line, not a field that
    # silently swallows the rows after it.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1  # the line the row being read starts on: where a stray quote would be
    try:
        # no row at all (text read elsewhere may be empty): no columns, so a missing one
        header = [name.strip() for name in next(reader, [])]
        _check_header(path, columns, header)
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


def jsonl_rows(path: Path, text: str, columns: Sequence[str]) -> Rows:
    """JSON Lines; a .json file may instead hold one list of objects."""
    is_list = path.suffix.lower() == ".json" and text.lstrip().startswith("[")
    for number, row in json_array(path, text) if is_list else json_lines(path, text):
        if not isinstance(row, dict):
            raise FinloraError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        check_columns(f"{path}:{number}", columns, list(row))
        yield number, row


def _reason(err: BaseException, path: Path) -> str:
    """The first line of a library's error, without the path it repeats."""
    line = str(err).strip().split("\n", 1)[0].replace(f" '{path}'", "").replace(str(path), "")
    return printable(line) or type(err).__name__


def parquet_rows(path: Path, columns: Sequence[str]) -> Rows:
    """A Parquet file, through pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise FinloraError(f"{path}: not a readable Parquet file ({_reason(err, path)})") from None
    _check_header(path, columns, table.column_names)
    yield from enumerate(table.to_pylist(), start=1)


def xlsx_rows(path: Path, columns: Sequence[str]) -> Rows:
    """The first sheet of an Excel workbook, through openpyxl: its first non-blank row is the
    header; cells hold what Excel last computed (a formula's value)."""
    import zipfile

    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, InvalidFileException) as err:
        raise FinloraError(
            f"{path}: not a readable .xlsx workbook ({_reason(err, path)})"
        ) from None
    try:
        sheet = book.worksheets[0]
        header: list[str] | None = None
        for number, cells in enumerate(sheet.iter_rows(min_row=1, values_only=True), start=1):
            if not any(c is not None and str(c).strip() for c in cells):
                continue
            if header is None:
                header = ["" if c is None else str(c).strip() for c in cells]
                _check_header(path, columns, header)
                continue
            yield number, dict(zip(header, cells, strict=False))
        if header is None:
            check_columns(f"{path} (sheet '{sheet.title}')", columns, [])
    finally:
        book.close()


def dataset_rows(path: Path, columns: Sequence[str]) -> Rows:
    """A directory written by `datasets`' `Dataset.save_to_disk`; a ClassLabel column gives its
    label names, not their numbers."""
    import pyarrow as pa
    from datasets import ClassLabel, Dataset, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise FinloraError(
            f"{path}: not a readable datasets directory ({_reason(err, path)})"
        ) from None
    if not isinstance(dataset, Dataset):
        splits = ", ".join(dataset)
        raise FinloraError(
            f"{path}: a DatasetDict with splits {splits}; name one split's directory "
            f"(e.g. {path / next(iter(dataset))})"
        )
    _check_header(path, columns, dataset.column_names)
    names = {c: f.names for c, f in dataset.features.items() if isinstance(f, ClassLabel)}
    for number, row in enumerate(dataset.to_list(), start=1):
        for column, label_names in names.items():
            value = row.get(column)
            if isinstance(value, int) and 0 <= value < len(label_names):
                row[column] = label_names[value]
        yield number, row


# Text formats are parsed from the file's text; the others read the file themselves.
TEXT_READERS: dict[str, Callable[[Path, str, Sequence[str]], Rows]] = {
    "csv": delimited_rows,
    "tsv": partial(delimited_rows, delimiter="\t"),
    "jsonl": jsonl_rows,
}
FILE_READERS: dict[str, Callable[[Path, Sequence[str]], Rows]] = {
    "parquet": parquet_rows,
    "xlsx": xlsx_rows,
    "hf": dataset_rows,
}
TABLE_FORMATS = (*TEXT_READERS, *FILE_READERS)


def table_rows(path: Path, fmt: str, columns: Sequence[str], text: str | None = None) -> Rows:
    """The rows of the `fmt` table at `path` (`text`: its text, already read, for a text
    format), checked to have `columns`."""
    if fmt in FILE_READERS:
        if fmt != "hf" and path.is_dir():
            raise FinloraError(f"{path}: is a directory, expected a .{fmt} file")
        if not path.exists():
            raise FinloraError(f"{path}: no such file")
        return FILE_READERS[fmt](path, columns)
    return TEXT_READERS[fmt](path, read_text(path) if text is None else text, columns)
