"""The README's Python API example runs as written, on the embedded SmolLM2."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _first_python_block(markdown: str) -> str:
    match = re.search(r"```python\n(.*?)```", markdown, re.S)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_python_example_runs(tmp_path: Path) -> None:
    code = _first_python_block((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "import finlora" in code
    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # it names a recipe by its path
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    accuracy, macro_f1 = (float(x) for x in lines[0].split())
    assert 0 <= accuracy <= 1 and 0 <= macro_f1 <= 1
    label = lines[1].split()[0]
    assert label in {"negative", "neutral", "positive"}
    assert (tmp_path / "runs" / "api-example" / "template" / "sentiment.json").is_file()
    assert (tmp_path / "exports" / "api-example" / "config.json").is_file()
