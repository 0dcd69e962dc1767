"""The docs stay in step with the code: generated pages current, README short, no work-log talk."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
# "stop 16", "stops 17-18", "issue 3": a work session's numbering, which no reader can look up.
SESSION_TALK = re.compile(r"\b(stops?|issues?) \d+", re.IGNORECASE)
README_MAX_LINES = 200


def _load_generator() -> ModuleType:
    path = ROOT / "tools" / "gen_docs.py"
    spec = importlib.util.spec_from_file_location("gen_docs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_docs", module)
    spec.loader.exec_module(module)
    return module


gen_docs = _load_generator()


@pytest.mark.parametrize("name", ["cli.md", "config.md"])
def test_generated_page_is_current(name: str) -> None:
    path = ROOT / "docs" / name
    expected = gen_docs.pages()[path]
    assert path.read_text(encoding="utf-8") == expected, (
        f"docs/{name} is out of date: run `make docs` (python tools/gen_docs.py)"
    )


def test_check_names_a_stale_page(tmp_path: Path, monkeypatch, capsys) -> None:
    stale = tmp_path / "cli.md"
    stale.write_text("old\n", encoding="utf-8")
    monkeypatch.setattr(gen_docs, "ROOT", tmp_path)
    monkeypatch.setattr(gen_docs, "pages", lambda: {stale: "new\n"})
    assert gen_docs.main(["--check"]) == 1
    assert "cli.md is out of date" in capsys.readouterr().err
    assert stale.read_text(encoding="utf-8") == "old\n"  # --check writes nothing
    assert gen_docs.main([]) == 0
    assert stale.read_text(encoding="utf-8") == "new\n"
    assert gen_docs.main(["--check"]) == 0


def test_every_config_field_has_help() -> None:
    missing = [
        f"{prefix}.{f.name}" if prefix else f.name
        for prefix, _cls, fields in gen_docs.config_sections()
        for f in fields
        if not gen_docs.field_help(f).strip()
    ]
    assert not missing, f"config fields without metadata['help']: {', '.join(missing)}"


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def _hits(paths: list[Path]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in paths
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if SESSION_TALK.search(line)
    ]


def test_no_session_numbers_in_the_source() -> None:
    hits = _hits(sorted((ROOT / "src").rglob("*.py")))
    assert not hits, "comments that cite a work session:\n" + "\n".join(hits)


def test_no_session_numbers_in_the_docs() -> None:
    hits = _hits([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    assert not hits, "docs that cite a work session:\n" + "\n".join(hits)
