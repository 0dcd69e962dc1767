"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from finlora.errors import FinloraError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    The temporary file lives in the same directory so the final `os.replace` is atomic.
    On an exception the temporary file is removed and `path` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the final file the permissions an ordinary open() would.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """`rows` (the header first) as CSV text."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it takes `path`'s place.

    With `replace=False` an existing `path` wins (another process finished first) and the
    new one is discarded. On an exception nothing at `path` changes.
    """
    target = Path(path)
    old = target.with_name(f".{target.name}.old")  # raises for "." before anything is made
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if target.exists():
            if not replace:
                return
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_output_file(out: Path, suffixes: Sequence[str]) -> None:
    """Refuse, before any work, an output file that cannot be written where it is named: a
    directory, a path under a file, a folder that takes no new file, or a suffix not in
    `suffixes`.

    Raises FinloraError naming the path.
    """
    if out.is_dir():
        raise FinloraError(f"{out}: is a directory; name a file")
    for path in out.parents:
        if path.exists() and not path.is_dir():
            raise FinloraError(f"{path}: exists and is not a directory")
    if out.suffix.lower() not in suffixes:
        raise FinloraError(f"{out}: name a {' or '.join(suffixes)} file")
    check_can_create(out)


def check_can_create(out: Path) -> None:
    """Refuse `out` (a file or directory to be) where its folder takes no new file.

    Outputs are written beside themselves and renamed into place, so the nearest existing
    folder must take a new file: try one (a permission check alone passes for root on a
    read-only mount, and /proc takes nothing).
    """
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise FinloraError(f"{folder}: cannot create a file here ({exc.strerror or exc})") from None


def check_new_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output directory that is a file, or holds files, unless `overwrite`.

    Raises FinloraError naming the path and the option that overrides it.
    """
    if out.name in ("", ".", ".."):
        raise FinloraError(f"{out}: give the output directory a name of its own")
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise FinloraError(f"{path}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FinloraError(f"{out}: output directory exists and is not empty (use --overwrite)")
