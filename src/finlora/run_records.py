"""The typed records a run writes and reads back: split.json (`SplitRecord`, with each
source's `SourceRecord` and the data's `DataFingerprint`), manifest.json (`Manifest`) and
calibration.json (`Calibration`). Each writes itself atomically and checks what it reads; errors
name the file. `finlora.runs` holds the directory they live in."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finlora import atomic
from finlora.errors import FinloraError

if TYPE_CHECKING:
    from typing import TypeAlias

    from finlora.data.prepare import PreparedData, PreparedInstruct

    Prepared: TypeAlias = PreparedData | PreparedInstruct

SPLIT_NAMES = ("train", "validation", "test")


def read_json(path: Path) -> Any:
    """A JSON file; errors name the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FinloraError(f"{path}: unreadable ({exc})") from None


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

    def read_again(self, data: Prepared) -> bool:
        """`matches`, for data read right after `problem()` found every recorded file
        unchanged: read from those same paths, its files need no second hash."""
        if {str(f) for f in data.files} != set(self.files):
            return self.matches(data)  # older runs recorded relative paths
        return not self.records_sha256 or self.records_sha256 == data.records_sha256

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
