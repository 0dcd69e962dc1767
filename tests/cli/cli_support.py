"""What the command-line tests share: a result type, the subprocess runner, the in-process
`main()` runner behind the `cli` fixture (tests/cli/conftest.py), and the one-line-error check."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from finlora.cli import main


class Result(NamedTuple):
    """Exit status, stdout, stderr (unpacks as a tuple too)."""

    code: int
    out: str
    err: str


def run_subprocess(*args: object, cwd: Path, stdin: str | None = None) -> Result:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "finlora.cli", *map(str, args)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit 2 and exactly one stderr line, `finlora: error: ...`, holding every fragment."""
    assert result.code == 2, result
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    (line,) = lines
    assert line.startswith("finlora: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def in_process_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., Result]:
    """Call `finlora.cli.main()` in this process, from an empty working directory that the
    command must leave empty."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)

    def invoke(*args: object, stdin: str | None = None) -> Result:
        monkeypatch.setattr(sys, "argv", ["finlora", *map(str, args)])
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        assert not any(work.iterdir()), "the command wrote into the working directory"
        return Result(code, out, err)

    return invoke


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]
