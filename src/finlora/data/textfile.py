"""Read a data file as text, choosing UTF-8 or Windows-1252 (Latin-1 alike) per file, and repair
what a wrong decode left in it.

Financial PhraseBank ships some files in Latin-1 and one in UTF-8, so the encoding cannot be a
setting: it is decided per file, and binary files are refused rather than decoded into noise.
Text as found in the wild also carries mojibake and stray control characters; `repair` undoes
them (ftfy), so a file is never refused for a few characters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from finlora.errors import FinloraError

_BOM = b"\xef\xbb\xbf"
STDIN = "standard input"
# Real text never holds NUL or C0 controls other than tab/newline/carriage return. Nor C1
# controls (U+0080..U+009F) read from single bytes: Windows-1252 reads all but five of those
# bytes as characters, so such a control is one of the five undefined bytes. In UTF-8 a C1
# control is two bytes written on purpose, typically a stray left in otherwise good text by a
# Windows-1252 round trip (the Twitter Financial News set has 31): `repair` undoes those.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_CONTROL_OR_C1 = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x80-\x9f]")
# Binary data (an image, a zip, a workbook saved as .csv) is full of control characters; a few
# in a text file are strays to repair, never a reason to refuse the file.
_BINARY_SHARE = 0.01


def has_bom(path: Path) -> bool:
    """Whether the file at `path` starts with a UTF-8 byte-order mark (as Excel writes one)."""
    try:
        with Path(path).open("rb") as fh:
            return fh.read(len(_BOM)) == _BOM
    except OSError:
        return False


def read_text(path: Path) -> str:
    """Return the text of `path`, decoded as UTF-8 (BOM stripped), else Windows-1252 (which
    reads Latin-1 text alike). A few stray control characters are kept for `repair`.

    Raises FinloraError if the file is missing, a directory, empty or whitespace-only, or
    binary: a NUL byte, or control characters in more than 1 % of it.
    """
    path = Path(path)
    if path.is_dir():
        raise FinloraError(f"{path}: is a directory, expected a data file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FinloraError(f"{path}: no such file") from None
    except OSError as err:
        raise FinloraError(f"{path}: cannot read ({err.strerror})") from None
    return decode_text(data, str(path))


# Excel on Windows saves CSV as Windows-1252: Latin-1 with curly quotes, dashes and the euro
# sign where Latin-1 has control characters. Latin-1 files decode alike. ftfy's "sloppy" variant
# takes the five bytes Windows-1252 leaves undefined as Latin-1 does, so it reads any byte.
_ENCODINGS = ("utf-8", "sloppy-windows-1252")


def _decode(data: bytes) -> tuple[str, str]:
    """`data` in the first of `_ENCODINGS` that reads it, and that encoding's name."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        import ftfy.bad_codecs  # noqa: F401  (registers the sloppy codecs)

        return data.decode(_ENCODINGS[-1]), _ENCODINGS[-1]


def decode_text(data: bytes, name: str) -> str:
    """`data` decoded as `read_text` decodes a file; `name` (a path, "standard input") starts
    the error messages.

    Raises FinloraError for empty or whitespace-only text, or binary data (as `read_text`).
    """
    offset = len(_BOM) if data.startswith(_BOM) else 0
    text, encoding = _decode(data[offset:])
    controls = _CONTROL if encoding == "utf-8" else _CONTROL_OR_C1
    bad = text.find("\x00")
    if bad < 0:
        strays = [m.start() for m in controls.finditer(text)]
        if len(strays) > len(text) * _BINARY_SHARE:
            bad = strays[0]
    if bad >= 0:
        byte_offset = offset + len(text[:bad].encode(encoding))
        raise FinloraError(
            f"{name}: undecodable bytes at byte offset {byte_offset} "
            f"(control character U+{ord(text[bad]):04X}; neither UTF-8 nor Latin-1 text)"
        )
    if not text.strip():
        raise FinloraError(f"{name}: file is empty" if name != STDIN else f"{name}: no text")
    return text


@cache
def _encoding_fixes() -> Any:
    """ftfy's encoding fixes only: its other fixes (straight quotes for curly ones, NFC,
    half-width letters for full-width ones, HTML entities) would change text that is not
    broken."""
    import ftfy

    return ftfy.TextFixerConfig(
        unescape_html=False,
        remove_terminal_escapes=False,
        fix_latin_ligatures=False,
        fix_character_width=False,
        uncurl_quotes=False,
        fix_line_breaks=False,
        fix_surrogates=False,
        remove_control_chars=False,
        normalization=None,
    )


_C1 = re.compile("[\x80-\x9f]")


def repair(text: str) -> str:
    """`text` with the marks of a wrong decode undone, clean text unchanged.

    ftfy fixes mojibake (UTF-8 read as Windows-1252: "â€™" for "’") and the C1 controls a
    Windows-1252 round trip leaves (U+0080 where "€" was meant). A C1 control still left is one
    of the five bytes Windows-1252 leaves undefined, the remnant of a character lost on the way
    (U+009D after a quote: the last byte of a closing quote), so it is dropped; a stray C0
    control (a vertical tab from a spreadsheet cell) becomes a space.
    """
    if not text.isascii():
        import ftfy

        text = _C1.sub("", ftfy.fix_text(text, _encoding_fixes()))
    return _CONTROL.sub(" ", text)


def read_stream(stream: Any) -> str:
    """Standard input (or any text stream), decoded from its bytes as `read_text` decodes a
    file: the locale's decoder would keep a BOM and turn Latin-1 into surrogates."""
    buffer = getattr(stream, "buffer", None)
    data = buffer.read() if buffer is not None else stream.read().encode("utf-8")
    return decode_text(data, STDIN)


def from_terminal(text: str) -> str:
    """`text` as typed or piped in: bytes the locale could not decode reach Python as lone
    surrogates (surrogateescape), which no tokenizer takes; they are decoded as files are,
    Latin-1 where the whole is not UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _decode(text.encode("utf-8", "surrogateescape"))[0]


def json_lines(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) for each non-blank line of JSON Lines text."""
    # split on "\n" only: str.splitlines also breaks on U+2028, form feeds etc., which would
    # make line numbers disagree with what an editor shows.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise FinloraError(
                f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}; "
                "expected one JSON object per line)"
            ) from None
        except (ValueError, RecursionError) as err:
            raise FinloraError(f"{path}:{number}: {json_beyond_limits(err)}") from None
        yield number, value


def json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line, element) for each element of a top-level JSON array, with the line it starts on
    (a list is what Alpaca-style .json files and many exports hold)."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise FinloraError(f"{path}: expected a JSON list")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise FinloraError(f"{path}: unterminated JSON list")
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise FinloraError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as err:
            raise FinloraError(f"{path}:{line}: {json_beyond_limits(err)}") from None
        yield line, element


def json_beyond_limits(err: ValueError | RecursionError) -> str:
    """What stopped Python's JSON reader short of a syntax error: a value nested past the
    recursion limit, or an integer of more than 4300 digits (`sys.get_int_max_str_digits`)."""
    if isinstance(err, RecursionError):
        return "malformed JSON (values nested too deeply)"
    return "malformed JSON (a number with too many digits)"


def printable(value: str) -> str:
    """`value` with line breaks and other unprintable characters escaped as Python writes them
    (`\\n`, `\\u2028`), so that a message quoting a user's value stays one line."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
