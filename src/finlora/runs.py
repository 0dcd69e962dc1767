"""The run directory: its layout, the manifest, and checks before anything is written.

RUN_DIR/
  adapter/            best adapter: PEFT's files, or the trained tensors (freeze/full), and
                      finlora_method.json naming the method (safetensors and JSON only)
  tokenizer/          the tokenizer the run used
  config.yaml         resolved config
  split.json          labels, data files and the row indices of each split
  metrics.jsonl       one JSON record per log step and per epoch
  loss_curve.png
  manifest.json       base model and data sha256, seed, versions, git commit, timings
  checkpoints/        step-NNNNNN/ for --resume
  eval/               reports written by `finlora eval`
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finlora import atomic
from finlora.errors import FinloraError

VERSIONED = ("finlora", "torch", "transformers", "peft", "accelerate", "safetensors", "numpy")


@dataclass(frozen=True)
class RunDir:
    root: Path

    adapter = property(lambda self: self.root / "adapter")
    tokenizer = property(lambda self: self.root / "tokenizer")
    config = property(lambda self: self.root / "config.yaml")
    split = property(lambda self: self.root / "split.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    loss_curve = property(lambda self: self.root / "loss_curve.png")
    manifest = property(lambda self: self.root / "manifest.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    eval_dir = property(lambda self: self.root / "eval")

    def check_new(self, overwrite: bool) -> None:
        """Refuse an existing non-empty directory unless `overwrite`; then it is emptied."""
        if self.root.exists() and not self.root.is_dir():
            raise FinloraError(f"{self.root}: exists and is not a directory")
        if self.root.is_dir() and any(self.root.iterdir()) and not overwrite:
            raise FinloraError(
                f"{self.root}: output directory exists and is not empty "
                "(use --overwrite to replace it, or --resume to continue it)"
            )

    def create(self, overwrite: bool) -> None:
        self.check_new(overwrite)
        if self.root.is_dir() and overwrite:
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def require_trained(self) -> None:
        """Raise unless this is a finished run directory."""
        if not self.root.is_dir():
            raise FinloraError(f"{self.root}: no such run directory")
        markers = ("adapter_config.json", "finlora_method.json")
        if not any((self.adapter / m).is_file() for m in markers) or not self.split.is_file():
            raise FinloraError(f"{self.root}: not a finished finlora run (no adapter or split)")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past `after_step`: a resumed run repeats them from its checkpoint."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        atomic.write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise FinloraError(f"{path}: unreadable ({exc})") from None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The finlora checkout's commit, when finlora runs from one (editable installs)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")
