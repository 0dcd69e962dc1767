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
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finlora import atomic
from finlora.errors import FinloraError

if TYPE_CHECKING:
    from finlora.config import RunConfig

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
        """Refuse an existing non-empty directory unless `overwrite`; then it is emptied. Only
        a finlora run is ever emptied: --overwrite on any other folder (or `.`) is refused."""
        for path in (self.root, *self.root.parents):
            if path.exists() and not path.is_dir():
                raise FinloraError(f"{path}: exists and is not a directory")
        if not (self.root.is_dir() and any(self.root.iterdir())):
            return
        if not overwrite:
            raise FinloraError(
                f"{self.root}: output directory exists and is not empty "
                "(use --overwrite to replace it, or --resume to continue it)"
            )
        if not self.is_finlora_run():
            raise FinloraError(
                f"{self.root}: not a finlora run, so --overwrite leaves it alone "
                "(name a new --output)"
            )

    def is_finlora_run(self) -> bool:
        """Whether the directory holds what finlora writes: a manifest that says so, or a
        split.json of its shape (a run stopped before its manifest)."""
        for path, keys in ((self.manifest, ("finlora_run",)), (self.split, ("task", "train"))):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and all(k in data for k in keys):
                return True
        return False

    def create(self, overwrite: bool) -> None:
        self.check_new(overwrite)
        if self.root.is_dir() and overwrite:
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def require_trained(self) -> None:
        """Raise unless this is a finished run directory, with every file loading it reads."""
        if not self.root.exists():
            raise FinloraError(f"{self.root}: no such run directory")
        if not self.root.is_dir():
            raise FinloraError(f"{self.root}: is a file, not a run directory")
        markers = ("adapter_config.json", "finlora_method.json")
        if not any((self.adapter / m).is_file() for m in markers) or not self.split.is_file():
            raise FinloraError(f"{self.root}: not a finished finlora run (no adapter or split)")
        if not self.config.is_file():
            raise FinloraError(f"{self.config}: missing (the run's configuration)")
        if not any(self.adapter.glob("*.safetensors")):
            raise FinloraError(f"{self.adapter}: no adapter weights (*.safetensors)")
        if not (self.tokenizer.is_dir() and any(self.tokenizer.iterdir())):
            raise FinloraError(f"{self.tokenizer}: missing (the tokenizer the run trained with)")

    def read_config(self) -> RunConfig:
        """config.yaml, as the run trained with it; errors name the file."""
        from finlora.config import config_from_dict, read_yaml

        data = read_yaml(self.config)  # its own errors name the file
        try:
            return config_from_dict(data)
        except FinloraError as exc:
            raise FinloraError(f"{self.config}: {exc}") from None

    def read_split(self) -> dict[str, Any]:
        """split.json, checked for what loading and evaluation read from it."""
        split = self.read_json(self.split)
        labels = split.get("labels") if isinstance(split, dict) else None
        # An instruct run's labels (of its label-answer records) may be none at all.
        needed = split.get("task", "classify") == "classify" if isinstance(split, dict) else True
        if not (
            isinstance(labels, list)
            and (labels or not needed)
            and all(isinstance(x, str) for x in labels)
        ):
            raise FinloraError(f"{self.split}: malformed (no list of labels)")
        for name in ("train", "validation", "test"):
            rows = split.get(name, [])
            if not (isinstance(rows, list) and all(type(i) is int and i >= 0 for i in rows)):
                raise FinloraError(f"{self.split}: malformed ('{name}' is not a list of rows)")
        return typing.cast(dict[str, Any], split)

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
