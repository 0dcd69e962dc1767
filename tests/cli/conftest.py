"""The CLI tests' fixtures: `cli` (`finlora ARGS...` through `finlora.cli.main()` in this
process), and one tiny run trained through the real command (`trained`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Result, in_process_cli, run_subprocess, set_args


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., Result]:
    return in_process_cli(capsys, monkeypatch, tmp_path)


@pytest.fixture(scope="session")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(
        "# finlora train tiny.yaml --set model.name=DIR --set data.path=FILE\nseed: 42\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="session")
def trained(
    tmp_path_factory: pytest.TempPathFactory, config_file: Path, tiny_overrides: list[str]
) -> Path:
    """One tiny run trained through `finlora train` in a subprocess, shared by the CLI tests."""
    work = tmp_path_factory.mktemp("train-cwd")
    output = work / "runs" / "tiny"
    result = run_subprocess(
        "train", config_file, "--output", output, "--no-progress",
        *set_args([*tiny_overrides, "train.max_steps=6", "train.learning_rate=0.01"]),
        cwd=work,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.out.splitlines()[0].startswith("trained 6 steps in ")
    assert re.search(r"tokens/s, peak RSS \d+\.\d\d GiB\)", result.out.splitlines()[0])
    assert result.out.splitlines()[-1] == f"run directory: {output}"
    assert "Traceback" not in result.err
    return output
