"""What the evaluators of every task share: report names and titles."""

from __future__ import annotations

import hashlib
from pathlib import Path

from finlora.inference import LoadedRun


def data_report_stem(path: Path, *variant: str) -> str:
    """The report name for `eval --data FILE`: "data-<stem>-<6 hex digits of its absolute path
    and variant>". Never "test", the run's own held-out split (which export quotes), and never
    that of another file with the same name."""
    key = "\0".join([str(path.resolve()), *variant])
    return f"data-{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"


def report_title(loaded: LoadedRun, stem: str) -> str:
    """What a report is of: the run (or its zero-shot base model) and the data's stem."""
    return f"{'zero-shot base model' if loaded.zero_shot else loaded.run.root.name}: {stem}"
