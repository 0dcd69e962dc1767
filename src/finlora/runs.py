"""The run directory: its layout, and the typed records a run writes and reads back.

RUN_DIR/
  adapter/            best adapter: PEFT's files, or the trained tensors (freeze/full), and
                      finlora_method.json naming the method (safetensors and JSON only)
  tokenizer/          the tokenizer the run used
  config.yaml         resolved config (`RunConfig`)
  template/NAME.json  the prompt template the run trained with, under its own name (a copy:
                      later edits of the template file, or of a shipped one, do not change a
                      trained run; none for the model's own chat template)
  split.json          labels, data fingerprint and the row indices of each split (`SplitRecord`);
                      for data.sources, each source's file, rows and split (`SourceRecord`)
  metrics.jsonl       one JSON record per log step and per epoch
  loss_curve.png
  manifest.json       base model and data sha256, seed, versions, git commit, timings (`Manifest`)
  calibration.json    a classification run's temperature, fitted on its validation split at
                      the best epoch (`Calibration`)
  checkpoints/        step-NNNNNN/ for --resume
  eval/               reports written by `finlora eval`

`Run.open` reads config and split once, checked; everything that works on a trained run takes
the `Run` it opened. Runs written before the template copy or the typed records still load.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finlora import atomic
from finlora.errors import FinloraError
from finlora.run_records import (
    SPLIT_NAMES,
    Calibration,
    DataFingerprint,
    Manifest,
    SourceRecord,
    SplitRecord,
    read_json,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    from finlora.config import RunConfig
    from finlora.data.prepare import PreparedData, PreparedInstruct

    Prepared: TypeAlias = PreparedData | PreparedInstruct

__all__ = [
    "SPLIT_NAMES",
    "Calibration",
    "DataFingerprint",
    "Manifest",
    "Run",
    "RunDir",
    "SourceRecord",
    "SplitRecord",
    "git_commit",
    "library_versions",
    "read_json",
]

VERSIONED = (
    "finlora",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "safetensors",
    "numpy",
)


@dataclass(frozen=True)
class RunDir:
    """Where each file of a run lives, and the checks made before anything is written."""

    root: Path

    adapter = property(lambda self: self.root / "adapter")
    tokenizer = property(lambda self: self.root / "tokenizer")
    config = property(lambda self: self.root / "config.yaml")
    template_dir = property(lambda self: self.root / "template")
    split = property(lambda self: self.root / "split.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    loss_curve = property(lambda self: self.root / "loss_curve.png")
    manifest = property(lambda self: self.root / "manifest.json")
    calibration = property(lambda self: self.root / "calibration.json")
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

    def read_config(self, overrides: list[str] | None = None) -> RunConfig:
        """config.yaml as the run trained with it (plus `--set` items the caller has checked),
        its prompt template read from the run's own copy; errors name the file."""
        from finlora.config import apply_overrides, config_from_dict, read_yaml

        data = read_yaml(self.config)  # its own errors name the file
        model = data.get("model")
        if isinstance(model, dict):
            # Never taken from a run: a received run must not run its own code.
            data["model"] = {k: v for k, v in model.items() if k != "trust_remote_code"}
        try:
            cfg = config_from_dict(apply_overrides(data, overrides or []))
        except FinloraError as exc:
            raise FinloraError(f"{self.config}: {exc}") from None
        copy = self.template_copy()
        if copy is not None:
            cfg.data.template = str(copy.resolve())
        return cfg

    def template_copy(self) -> Path | None:
        """The run's copy of its prompt template; None for runs older than the copy."""
        copies = sorted(self.template_dir.glob("*.json"))
        return copies[0] if len(copies) == 1 else None

    def write_template(self, name_or_path: str) -> None:
        """Keep a copy of the run's prompt template (none for the model's chat template)."""
        from finlora.prompts import template_text

        text = template_text(name_or_path)
        if text is not None:
            # Under its own name, which the prompt record of an export quotes.
            self.template_dir.mkdir(exist_ok=True)
            atomic.write_text(self.template_dir / f"{Path(name_or_path).stem}.json", text)

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
        return read_json(path)


@dataclass(frozen=True)
class Run:
    """A trained run, opened once: its layout, config and split, read and checked."""

    dir: RunDir
    config: RunConfig
    split: SplitRecord

    @classmethod
    def open(cls, root: Path) -> Run:
        """Open a finished run; raises FinloraError naming what is missing or malformed."""
        run_dir = RunDir(Path(root))
        run_dir.require_trained()
        return cls(run_dir, run_dir.read_config(), SplitRecord.read(run_dir.split))

    @property
    def root(self) -> Path:
        return self.dir.root

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def labels(self) -> list[str]:
        return list(self.split.labels)

    def manifest(self) -> Manifest | None:
        return Manifest.read(self.dir.manifest)

    def calibration(self) -> Calibration | None:
        return Calibration.read(self.dir.calibration)

    def check_data_unchanged(self) -> None:
        """Raise unless every data file of the run is there with the content it trained on."""
        problem = self.split.fingerprint.problem()
        if problem is not None:
            raise _cannot_rebuild(problem)

    def prepared(self) -> Prepared:
        """The run's data, prepared as training prepared it, after checking it is unchanged.
        Prepared once per opened run: eval, a suite's sets and few-shot examples all read it."""
        return self._prepared

    @functools.cached_property
    def _prepared(self) -> Prepared:
        from finlora.data.preference_prepare import prepare_preference
        from finlora.data.prepare import prepare_data, prepare_instruct

        self.check_data_unchanged()
        cfg = self.config
        prepare = {"instruct": prepare_instruct, "preference": prepare_preference}
        data = prepare.get(self.task, prepare_data)(cfg.data, cfg.seed)
        same = self.split.fingerprint.read_again(data) and self.split.same_sources(data)
        if not same:
            raise _cannot_rebuild(
                f"{data.description}: changed since training (another finlora version?)"
            )
        if any(i >= len(data.examples) for i in self.split.test):
            raise FinloraError(
                f"{self.dir.split}: test rows past the data's {len(data.examples)} examples"
            )
        return data

    def test_rows(self) -> tuple[str, list[Any]]:
        """(description, rows): the exact rows the run held out for its test split."""
        data = self.prepared()
        rows = [data.examples[i] for i in self.split.test]
        return f"test split of {data.description}", rows


def _cannot_rebuild(problem: str) -> FinloraError:
    return FinloraError(
        f"{problem}; cannot rebuild the run's test split (pass --data to evaluate on a file)"
    )


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
