"""The `cli` fixture: `finlora ARGS...` through `finlora.cli.main()` in this process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Result, in_process_cli


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., Result]:
    return in_process_cli(capsys, monkeypatch, tmp_path)
