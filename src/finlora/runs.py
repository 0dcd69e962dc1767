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

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finlora import atomic
from finlora.errors import FinloraError

if TYPE_CHECKING:
    from typing import TypeAlias

    from finlora.config import RunConfig
    from finlora.data.prepare import PreparedData, PreparedInstruct

    Prepared: TypeAlias = PreparedData | PreparedInstruct

VERSIONED = ("finlora", "torch", "transformers", "peft", "accelerate", "safetensors", "numpy")
SPLIT_NAMES = ("train", "validation", "test")


def read_json(path: Path) -> Any:
    """A JSON file; errors name the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FinloraError(f"{path}: unreadable ({exc})") from None


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
class DataFingerprint:
    """What a run's data was: each file's sha256, and for the packaged instruction set (which
    has no file) its records' digest."""

    files: dict[str, str] = field(default_factory=dict)
    records_sha256: str | None = None

    @classmethod
    def of(cls, data: Prepared) -> DataFingerprint:
        from finlora.models.loading import sha256_file

        return cls({str(f): sha256_file(f) for f in data.files}, data.records_sha256)

    def problem(self) -> str | None:
        """Why the data can no longer be rebuilt as the run saw it, or None."""
        from finlora.models.loading import sha256_file

        for name, digest in self.files.items():
            path = Path(name)
            if not path.is_file():
                return f"{path}: training data not found"
            if sha256_file(path) != digest:
                return f"{path}: changed since training (sha256 differs)"
        return None

    def matches(self, data: Prepared) -> bool:
        """Whether `data`, prepared now, has the same contents (paths aside: old runs recorded
        relative ones) and the same packaged records."""
        now = DataFingerprint.of(data)
        same_files = sorted(now.files.values()) == sorted(self.files.values())
        return same_files and (not self.records_sha256 or self.records_sha256 == now.records_sha256)


def _row_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(i) is int and i >= 0 for i in value)


@dataclass(frozen=True)
class SourceRecord:
    """One source of a run on several files (data.sources), in split.json: its file and
    fingerprint, its rows [start, stop) in the pooled example list, and how it was sampled,
    split, weighted and found leaking into the test split."""

    name: str
    path: str
    sha256: str
    rows: tuple[int, int]
    loaded: int  # rows in the file, before max_rows
    max_rows: int | None
    weight: float
    split: dict[str, int]  # rows of the source in each split
    train_draws: int  # training rows an epoch draws, after the weight
    leakage: dict[str, int] = field(default_factory=dict)

    @classmethod
    def all_of(cls, data: PreparedData, fingerprint: DataFingerprint) -> list[SourceRecord]:
        split = data.split.to_dict()
        draws = data.train_draws if data.train_draws is not None else split["train"]
        records = []
        for s in data.sources:
            digests = [fingerprint.files[str(f)] for f in s.files]
            # One file: its own path and digest; several (a `datasets` directory): the
            # directory, and the digest of its files' digests.
            one = len(s.files) == 1
            records.append(
                cls(
                    s.name,
                    str(s.files[0] if one else s.path),
                    digests[0] if one else hashlib.sha256(" ".join(digests).encode()).hexdigest(),
                    (s.start, s.stop),
                    s.loaded,
                    s.max_rows,
                    s.weight,
                    {name: sum(1 for i in split[name] if i in s.rows) for name in SPLIT_NAMES},
                    sum(1 for i in draws if i in s.rows),
                    data.leakage.counts(s.rows) if data.leakage is not None else {},
                )
            )
        return records

    def contains(self, index: int) -> bool:
        return self.rows[0] <= index < self.rows[1]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows": list(self.rows)}

    @classmethod
    def from_dict(cls, raw: Any) -> SourceRecord:
        """Raises ValueError, TypeError or KeyError on a malformed entry."""
        start, stop = raw["rows"]
        if not (type(start) is int and type(stop) is int and 0 <= start <= stop):
            raise ValueError(f"rows {raw['rows']}")
        for key in ("name", "path", "sha256"):
            if not isinstance(raw[key], str):
                raise TypeError(f"{key} is not a string")
        return cls(
            raw["name"],
            raw["path"],
            raw["sha256"],
            (start, stop),
            int(raw["loaded"]),
            raw.get("max_rows"),
            float(raw["weight"]),
            {k: int(v) for k, v in raw["split"].items()},
            int(raw["train_draws"]),
            {k: int(v) for k, v in raw.get("leakage", {}).items()},
        )


@dataclass(frozen=True)
class SplitRecord:
    """split.json: the run's task, label set, data and the rows of each split."""

    task: str
    labels: list[str]
    train: list[int]
    validation: list[int]
    test: list[int]
    data: str = ""  # the data's description
    synthetic: bool = False
    seed: int | None = None
    fingerprint: DataFingerprint = field(default_factory=DataFingerprint)
    duplicates_across_splits: list[dict[str, Any]] = field(default_factory=list)
    # Written only for a run on data.sources or with data.dedup: a one-file run's split.json
    # keeps the layout it always had.
    leakage: dict[str, Any] | None = None
    sources: list[SourceRecord] = field(default_factory=list)

    @classmethod
    def of(cls, task: str, seed: int, data: Prepared) -> SplitRecord:
        from finlora.data.prepare import PreparedData

        rows = data.split.to_dict()
        fingerprint = DataFingerprint.of(data)
        leakage, sources = None, []
        if isinstance(data, PreparedData):
            if data.leakage is not None:
                source_of = data.source_of if data.sources else None
                leakage = data.leakage.to_dict(source_of)
            sources = SourceRecord.all_of(data, fingerprint)
        return cls(
            task,
            list(data.labels),
            rows["train"],
            rows["validation"],
            rows["test"],
            data.description,
            data.synthetic,
            seed,
            fingerprint,
            data.duplicates,
            leakage,
            sources,
        )

    def to_dict(self) -> dict[str, Any]:
        digest = self.fingerprint.records_sha256
        return {
            "task": self.task,
            "labels": self.labels,
            "data": self.data,
            "synthetic": self.synthetic,
            "files": self.fingerprint.files,
            "seed": self.seed,
            "duplicates_across_splits": self.duplicates_across_splits,
            **({"records_sha256": digest} if digest else {}),
            **({"leakage": self.leakage} if self.leakage is not None else {}),
            **({"sources": [s.to_dict() for s in self.sources]} if self.sources else {}),
            **{name: getattr(self, name) for name in SPLIT_NAMES},
        }

    def write(self, path: Path) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> SplitRecord:
        """split.json, checked for what loading and evaluation read from it."""
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise FinloraError(f"{path}: malformed (not a JSON object)")
        task = raw.get("task", "classify")
        labels = raw.get("labels")
        # An instruct run's labels (of its label-answer records) may be none at all.
        if not (
            isinstance(labels, list)
            and (labels or task != "classify")
            and all(isinstance(x, str) for x in labels)
        ):
            raise FinloraError(f"{path}: malformed (no list of labels)")
        for name in SPLIT_NAMES:
            if not _row_list(raw.get(name, [])):
                raise FinloraError(f"{path}: malformed ('{name}' is not a list of rows)")
        files = raw.get("files", {})
        if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
            raise FinloraError(f"{path}: malformed ('files' is not a map of sha256 digests)")
        leakage = raw.get("leakage")
        if not (leakage is None or isinstance(leakage, dict)):
            raise FinloraError(f"{path}: malformed ('leakage' is not an object)")
        return cls(
            str(task),
            labels,
            train=list(raw.get("train", [])),
            validation=list(raw.get("validation", [])),
            test=list(raw.get("test", [])),
            data=str(raw.get("data", "")),
            synthetic=bool(raw.get("synthetic", False)),
            seed=raw.get("seed"),
            fingerprint=DataFingerprint(files, raw.get("records_sha256")),
            duplicates_across_splits=list(raw.get("duplicates_across_splits", [])),
            leakage=leakage,
            sources=_read_sources(path, raw.get("sources", [])),
        )

    def same_rows(self, data: Prepared) -> bool:
        now = data.split.to_dict()
        return all(getattr(self, name) == now[name] for name in SPLIT_NAMES)

    def same_sources(self, data: Prepared) -> bool:
        """Whether `data` pools its sources into the rows this run recorded (a one-file run
        records none)."""
        now = [(s.name, (s.start, s.stop)) for s in getattr(data, "sources", [])]
        return [(s.name, s.rows) for s in self.sources] == now

    def source_names(self, indices: list[int]) -> list[str]:
        """The source each row of `indices` came from ("" for a one-file run)."""
        return [next((s.name for s in self.sources if s.contains(i)), "") for i in indices]


def _read_sources(path: Path, raw: Any) -> list[SourceRecord]:
    if not isinstance(raw, list):
        raise FinloraError(f"{path}: malformed ('sources' is not a list)")
    try:
        return [SourceRecord.from_dict(entry) for entry in raw]
    except (KeyError, TypeError, ValueError) as exc:
        raise FinloraError(f"{path}: malformed ('sources' entry: {exc})") from None


@dataclass
class Manifest:
    """manifest.json: what a finished run was made of and how long it took."""

    task: str
    base_model: dict[str, Any]
    data: dict[str, Any]
    method: str
    seed: int
    steps: int
    method_options: dict[str, Any] = field(default_factory=dict)
    learning_rate: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    best_epoch: int | None = None
    device: str = ""
    processes: int = 1
    precision: str = ""
    attention: str = ""
    versions: dict[str, str | None] = field(default_factory=dict)
    git_commit: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    finished_at: str = ""
    finlora_run: int = 1

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"finlora_run": data.pop("finlora_run"), **data}

    def write(self, path: Path) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        """The manifest, or None for a run without one (stopped before it finished)."""
        if not path.is_file():
            return None
        raw = read_json(path)
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise FinloraError(f"{path}: malformed manifest ({exc})") from None


@dataclass(frozen=True)
class Calibration:
    """calibration.json: the temperature that divides the run's label scores before their
    softmax, and the validation ECE before and after it."""

    temperature: float
    epoch: int
    val_ece: float
    val_ece_calibrated: float
    fit_on: str = "validation split"

    def write(self, path: Path) -> None:
        atomic.write_json(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path: Path) -> Calibration | None:
        """The run's calibration; None for a run without one (instruct, no validation split,
        or older than calibration)."""
        if not path.is_file():
            return None
        raw = read_json(path)
        try:
            calibration = cls(**raw)
            valid = math.isfinite(calibration.temperature) and calibration.temperature > 0
        except TypeError:
            valid = False
        if not valid:
            raise FinloraError(f"{path}: malformed (no positive temperature)")
        return calibration


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

    def check_data_unchanged(self, data: Prepared | None = None) -> None:
        """Raise unless the run's data can be rebuilt as it trained on it: every file there
        with the same content and, given the data as prepared now, the same records."""
        problem = self.split.fingerprint.problem()
        if problem is None and data is not None and not self._same_data(data):
            problem = f"{data.description}: changed since training (another finlora version?)"
        if problem is not None:
            raise FinloraError(
                f"{problem}; cannot rebuild the run's test split (pass --data to evaluate on "
                "a file)"
            )

    def _same_data(self, data: Prepared) -> bool:
        return self.split.fingerprint.matches(data) and self.split.same_sources(data)

    def data_available(self) -> bool:
        """Whether the run's data files are here unchanged (the synthetic and packaged sets
        always are)."""
        return self.split.fingerprint.problem() is None

    def prepared(self) -> Prepared:
        """The run's data, prepared as training prepared it, after checking it is unchanged."""
        from finlora.data.prepare import prepare_data, prepare_instruct

        self.check_data_unchanged()
        cfg = self.config
        data = (
            prepare_instruct(cfg.data, cfg.seed)
            if self.task == "instruct"
            else prepare_data(cfg.data, cfg.seed)
        )
        self.check_data_unchanged(data)
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
