"""From a data config to examples (or instruction records), labels and a split: what a run
trains and tests on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finlora.config import DataConfig
from finlora.config.sections import DataSource
from finlora.data.examples import Example
from finlora.data.fin_instruct import FIN_INSTRUCT_NOTE, fin_instruct_set, records_sha256
from finlora.data.instruct import InstructRecord, load_instruct
from finlora.data.leakage import Leakage, find_leakage, without_leaks
from finlora.data.loaders import (
    FPB_LABELS,
    files_read,
    load_examples,
    parse_label_map,
    reads_as_fpb,
)
from finlora.data.sources import SourceSlice, pool_sources, training_draws
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
    sources: list[SourceSlice] = field(default_factory=list)  # data.sources, each's rows
    # Found for data.sources or data.dedup; a one-file run without dedup records none, so its
    # split.json keeps the layout it always had.
    leakage: Leakage | None = None
    train_draws: list[int] | None = None  # the training rows weighted, when sources weigh them

    @property
    def synthetic(self) -> bool:
        return not self.files

    def rows(self, name: str) -> list[Example]:
        """The examples of split `name`; for "train", as an epoch draws them (data.sources'
        weights)."""
        indices = getattr(self.split, name)
        if name == "train" and self.train_draws is not None:
            indices = self.train_draws
        return [self.examples[i] for i in indices]

    def source_of(self, index: int) -> str:
        """The name of the source that row `index` came from ("" for a one-file run)."""
        return next((s.name for s in self.sources if index in s.rows), "")


def _is_fpb(path: Path, fmt: str) -> bool:
    return reads_as_fpb(path, fmt)


def data_files(path: Path, fmt: str, agreement: str) -> list[Path]:
    """The files a loader reads for `path`: an FPB directory means one agreement file, a
    `datasets` directory its Arrow files."""
    return files_read(path, fmt, agreement)


def load_labelled(
    path: Path,
    fmt: str = "auto",
    *,
    agreement: str = "all",
    text_column: str = "text",
    label_column: str = "label",
    label_map: str | dict[str, str] | None = None,
    labels: list[str] | None = None,
) -> list[Example]:
    """Load a labelled file with loader options as the config and the CLI name them (a label
    map as written, "0=negative,...", or parsed)."""
    if _is_fpb(path, fmt):
        if label_map:
            raise FinloraError(
                f"{path}: a label map applies to CSV, TSV and JSON tables; Financial "
                "PhraseBank files have their own labels"
            )
        return load_examples(path, "fpb", agreement=agreement)
    if isinstance(label_map, str):
        label_map = parse_label_map(label_map) if label_map else None
    return load_examples(
        path,
        fmt,
        text_column=text_column,
        label_column=label_column,
        label_map=label_map or None,
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


def _load_one(cfg: DataConfig) -> tuple[list[Example], list[Path], str, bool]:
    """data.path (or $FINLORA_FPB_DIR, or the synthetic set): examples, files, description,
    and whether its labels are Financial PhraseBank's."""
    resolved = cfg.resolved_path()
    if resolved is None:
        return synthetic_sentiment(cfg.synthetic_size, seed=0), [], SYNTHETIC_NOTE, True
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
    is_fpb = _is_fpb(path, cfg.format)
    return examples, files, ", ".join(str(f) for f in files), is_fpb


def _source_files(path: Path, source: DataSource) -> list[Path]:
    return data_files(path, source.format, source.agreement)


def prepare_data(cfg: DataConfig, seed: int) -> PreparedData:
    """Load the configured data (data.sources, data.path, or the synthetic set) and split it
    deterministically by seed; with data.dedup, training rows a test row repeats are dropped."""
    sources: list[SourceSlice] = []
    if cfg.sources:
        pooled = pool_sources(cfg, seed, load_labelled, _source_files)
        examples, files, description = pooled.examples, pooled.files, pooled.description
        is_fpb = all(_is_fpb(Path(s.path), s.format) for s in cfg.sources)
        split, sources = pooled.split, pooled.sources
    else:
        examples, files, description, is_fpb = _load_one(cfg)
    labels = _label_set(cfg, examples, is_fpb)
    _check_label_case(labels, description, listed=bool(cfg.labels))
    if len(labels) < 2:
        raise FinloraError(f"{description}: needs at least two labels (found {labels})")
    if not cfg.sources:
        try:
            split = stratified_split(examples, cfg.test_fraction, cfg.val_fraction, seed)
        except FinloraError as exc:
            raise FinloraError(f"{description}: {exc}") from None
    leakage = None
    if cfg.sources or cfg.dedup:
        leakage = find_leakage(examples, split, cfg.dedup)
        split = without_leaks(split, leakage)
    draws = training_draws(split.train, sources, seed) if sources else None
    return PreparedData(
        examples,
        labels,
        split,
        files,
        description,
        cross_split_duplicates(examples, split),
        sources=sources,
        leakage=leakage,
        train_draws=draws if draws != list(split.train) else None,
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


def split_records(strata: list[Example], cfg: DataConfig, seed: int, description: str) -> Split:
    """Records split by the kind each `strata` example names, kept in proportion; with too few
    of one kind to place some in every split, as one group. Raises FinloraError when even one
    group is too small to hold some out."""
    try:
        return stratified_split(strata, cfg.test_fraction, cfg.val_fraction, seed)
    except FinloraError:
        flat = [Example(e.text, "all") for e in strata]
        try:
            return stratified_split(flat, cfg.test_fraction, cfg.val_fraction, seed)
        except FinloraError:
            raise FinloraError(
                f"{description}: {len(strata)} record(s) are too few to hold some out for "
                "validation and test (data.test_fraction, data.val_fraction)"
            ) from None


def prompt_texts(records: Sequence[Any]) -> list[Example]:
    """Each record's prompt as one text, to find prompts repeated across splits."""
    return [Example(str([(m.role, m.content) for m in r.prompt_messages]), "") for r in records]


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
    split = split_records(strata, cfg, seed, description)
    labels = sorted({x for r in records for x in (r.labels or ((r.label,) if r.label else ()))})
    return PreparedInstruct(
        records,
        split,
        files,
        description,
        labels,
        cross_split_duplicates(prompt_texts(records), split),
        None if files else records_sha256(records),
    )
