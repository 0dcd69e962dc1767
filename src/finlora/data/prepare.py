"""From a data config to examples (or instruction records), labels and a split: what a run
trains and tests on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finlora.config import DataConfig
from finlora.data.examples import Example
from finlora.data.fin_instruct import FIN_INSTRUCT_NOTE, fin_instruct_set, records_sha256
from finlora.data.instruct import InstructRecord, load_instruct
from finlora.data.loaders import FPB_FILES, FPB_LABELS, load_examples, parse_label_map
from finlora.data.split import Split, cross_split_duplicates, stratified_split
from finlora.data.synthetic import SYNTHETIC_NOTE, synthetic_sentiment
from finlora.errors import FinloraError


@dataclass
class PreparedData:
    examples: list[Example]
    labels: list[str]
    split: Split
    files: list[Path]  # the files actually read (empty for the synthetic set)
    description: str  # shown wherever the data is named
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    records_sha256: str | None = None  # only the packaged instruction set has one

    @property
    def synthetic(self) -> bool:
        return not self.files

    def rows(self, name: str) -> list[Example]:
        return [self.examples[i] for i in getattr(self.split, name)]


def data_files(path: Path, fmt: str, agreement: str) -> list[Path]:
    """The files a loader reads for `path`: an FPB directory means one agreement file."""
    if path.is_dir():
        return [path / FPB_FILES[agreement]]
    return [path]


def load_labelled(
    path: Path,
    fmt: str = "auto",
    *,
    agreement: str = "all",
    text_column: str = "text",
    label_column: str = "label",
    label_map: str | None = None,
    labels: list[str] | None = None,
) -> list[Example]:
    """Load a labelled file with loader options as the config and the CLI name them."""
    if fmt == "fpb" or (fmt == "auto" and (path.is_dir() or path.suffix.lower() == ".txt")):
        if label_map:
            raise FinloraError(
                f"{path}: a label map applies to CSV, TSV and JSON tables; Financial "
                "PhraseBank files have their own labels"
            )
        return load_examples(path, "fpb", agreement=agreement)
    return load_examples(
        path,
        fmt,
        text_column=text_column,
        label_column=label_column,
        label_map=parse_label_map(label_map) if label_map else None,
        labels=labels or None,
    )


def _label_set(cfg: DataConfig, examples: list[Example], is_fpb: bool) -> list[str]:
    if cfg.labels:
        unknown = sorted({e.label for e in examples} - set(cfg.labels))
        if unknown:
            raise FinloraError(f"data.labels: data has labels not listed: {', '.join(unknown)}")
        return list(cfg.labels)
    if is_fpb:
        return list(FPB_LABELS)
    return sorted({e.label for e in examples})


def _check_label_case(labels: list[str], description: str, listed: bool) -> None:
    """Labels found in the data that differ only in case ("Positive", "positive") are almost
    always one label written two ways: refused, unless data.labels lists both."""
    seen: dict[str, str] = {}
    for label in labels:
        other = seen.setdefault(label.casefold(), label)
        if other != label and not listed:
            raise FinloraError(
                f"{description}: labels {other!r} and {label!r} differ only in case (write "
                "them one way, or map every raw label with data.label_map)"
            )


def prepare_data(cfg: DataConfig, seed: int) -> PreparedData:
    """Load the configured data (or the synthetic set) and split it deterministically by seed."""
    resolved = cfg.resolved_path()
    if resolved is None:
        examples = synthetic_sentiment(cfg.synthetic_size, seed=0)
        files: list[Path] = []
        description = SYNTHETIC_NOTE
        is_fpb = True
    else:
        path = Path(resolved).expanduser()
        examples = load_labelled(
            path,
            cfg.format,
            agreement=cfg.agreement,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            label_map=cfg.label_map,
            labels=cfg.labels,
        )
        files = data_files(path, cfg.format, cfg.agreement)
        is_fpb = cfg.format == "fpb" or path.is_dir() or path.suffix.lower() == ".txt"
        description = ", ".join(str(f) for f in files)
    labels = _label_set(cfg, examples, is_fpb)
    _check_label_case(labels, description, listed=bool(cfg.labels))
    if len(labels) < 2:
        raise FinloraError(f"{description}: needs at least two labels (found {labels})")
    try:
        split = stratified_split(examples, cfg.test_fraction, cfg.val_fraction, seed)
    except FinloraError as exc:
        raise FinloraError(f"{description}: {exc}") from None
    return PreparedData(
        examples, labels, split, files, description, cross_split_duplicates(examples, split)
    )


@dataclass
class PreparedInstruct:
    """Instruction records and their split; the same shape a run records for classify data."""

    examples: list[InstructRecord]
    split: Split
    files: list[Path]  # empty for the packaged set
    description: str
    labels: list[str] = field(default_factory=list)  # labels named by label-answer records
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    # The packaged set has no file to hash: its records' digest stands in (files hold theirs).
    records_sha256: str | None = None

    @property
    def synthetic(self) -> bool:
        return not self.files

    def rows(self, name: str) -> list[InstructRecord]:
        return [self.examples[i] for i in getattr(self.split, name)]


def prepare_instruct(cfg: DataConfig, seed: int) -> PreparedInstruct:
    """Load instruction records (data.path, or the packaged set when empty) and split them.

    The split keeps label-answer records and free answers in proportion, so both are tested.
    """
    if cfg.path:
        path = Path(cfg.path).expanduser()
        records = load_instruct(path)
        files, description = [path], str(path)
    else:
        records = fin_instruct_set()
        files, description = [], FIN_INSTRUCT_NOTE
    strata = [Example(r.response, "label" if r.label else "free") for r in records]
    try:
        split = stratified_split(strata, cfg.test_fraction, cfg.val_fraction, seed)
    except FinloraError:
        # Too few of one kind to place some in every split: split them as one group.
        flat = [Example(e.text, "all") for e in strata]
        try:
            split = stratified_split(flat, cfg.test_fraction, cfg.val_fraction, seed)
        except FinloraError:
            raise FinloraError(
                f"{description}: {len(records)} record(s) are too few to hold some out for "
                "validation and test (data.test_fraction, data.val_fraction)"
            ) from None
    labels = sorted({x for r in records for x in (r.labels or ((r.label,) if r.label else ()))})
    texts = [Example(str([(m.role, m.content) for m in r.prompt_messages]), "") for r in records]
    return PreparedInstruct(
        records,
        split,
        files,
        description,
        labels,
        cross_split_duplicates(texts, split),
        None if files else records_sha256(records),
    )
