"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A write killed mid-way leaves only a temporary entry beside its target (`.NAME.XXXXXXXX.tmp`,
or `.NAME.old` for a directory being replaced), which `clean_leftovers` tidies. A write that
fails (a full disk, a read-only folder) is one line naming the path (`write_errors`).
`kill_point` marks where the crash test (benchmarks/crash_safety.py) may stop a process dead.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from finlora.errors import FinloraError

KILL_AT_ENV = "FINLORA_KILL_AT"
_passes: dict[str, int] = {}


def kill_point(name: str) -> None:
    """A point where a crash test may stop this process dead; inert unless $FINLORA_KILL_AT
    is `NAME:N`. Then the Nth time the process passes the point NAME it sends itself SIGKILL,
    as the kernel's OOM killer would: no handler, `finally` or flush runs.

    The points: `step` (mid optimizer step), `validation` (an epoch's validation under way),
    `checkpoint` (half the checkpoint's files written), `rename` (a directory written whole,
    not yet in place), `swap` (a replaced directory moved aside, the new one not yet in its
    place), `prune` (a new checkpoint in place, the older not yet removed).
    """
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _reason(exc: OSError) -> str:
    if exc.strerror:
        return exc.strerror
    return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__


@contextlib.contextmanager
def write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Raise a write that fails (a full disk, a read-only folder, a file over the size limit)
    as one FinloraError: `path`, then the system's reason.

    The writers written in Rust (safetensors, tokenizers) raise their own exception types with
    the system's error in the message ("I/O error: No space left on device (os error 28)");
    their other errors are bugs and pass through.
    """
    try:
        yield
    except FinloraError:
        raise
    except OSError as exc:
        raise FinloraError(f"{path}: cannot write ({_reason(exc)})") from None
    except Exception as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise FinloraError(f"{path}: cannot write ({os.strerror(int(code[1]))})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    The temporary file lives in the same directory so the final `os.replace` is atomic.
    On an exception the temporary file is removed and `path` is left untouched; a write that
    fails raises FinloraError naming `path` (`write_errors`).
    """
    target = Path(path)
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            # mkstemp creates 0600; give the final file the permissions an ordinary open() would.
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o666 & ~umask)
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike[str], replace: bool = True, durable: bool = False
) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it takes `path`'s place.

    With `replace=False` an existing `path` wins (another process finished first) and the
    new one is discarded. On an exception nothing at `path` changes. With `durable` its files
    reach the disk before the rename, and the rename before this returns: after a power cut
    `path` is whole too (a killed process needs no more: the page cache outlives it).
    """
    target = Path(path)
    old = target.with_name(f".{target.name}.old")  # raises for "." before anything is made
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        yield tmp
        if durable:
            for item in (*tmp.rglob("*"), tmp):
                _fsync(item)
        kill_point("rename")
        if target.exists():
            if not replace:
                return
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            kill_point("swap")
        tmp.rename(target)
        if durable:
            _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(folder: Path, name: str | None = None) -> None:
    """Tidy what atomic writes killed mid-way left in `folder` (for the entry `name`, or for
    all): a directory moved aside to be replaced and never replaced (`.NAME.old` without NAME)
    goes back; temporary files and directories go. Only for a folder no other process is
    writing to at the time (a run being resumed, a cache entry under its lock).
    """
    pattern = "*" if name is None else glob.escape(name)
    for old in folder.glob(f".{pattern}.old"):
        original = old.with_name(old.name[1 : -len(".old")])
        if original.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(original)
    for tmp in folder.glob(f".{pattern}.*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


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
