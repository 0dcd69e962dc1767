"""Several labelled files in one run (data.sources): each read with its own columns and label
map, split by the run's seed, its training part sampled to max_rows, then pooled into one
example list in which each source holds a range of rows; its training rows are drawn `weight`
times."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from finlora.config.sections import DataConfig, DataSource
from finlora.data.examples import Example
from finlora.data.split import SPLIT_NAMES, Split, stratified_split
from finlora.errors import FinloraError

# How prepare.py reads one file with a source's options (its load_labelled).
Loader = Callable[..., list[Example]]


@dataclass(frozen=True)
class SourceSlice:
    """One source's place in the pooled example list: rows [start, stop)."""

    name: str
    path: Path  # as the source names it
    files: list[Path]  # the files read (a Financial PhraseBank directory: its agreement file)
    start: int
    stop: int
    loaded: int  # rows in the file, before max_rows sampled its training part
    max_rows: int | None
    weight: float

    @property
    def rows(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class Pooled:
    """Every source's rows, one after the other, and the union of their splits."""

    examples: list[Example]
    split: Split
    sources: list[SourceSlice]

    @property
    def files(self) -> list[Path]:
        return [f for s in self.sources for f in s.files]

    @property
    def description(self) -> str:
        return "; ".join(f"{s.name}: {', '.join(map(str, s.files))}" for s in self.sources)


def sample_rows(examples: Sequence[Example], max_rows: int, seed: int) -> list[int]:
    """The indices (sorted) of `max_rows` examples, stratified by label, fixed by `seed`.

    Raises FinloraError when a label is too rare to sample in proportion.
    """
    if max_rows >= len(examples):
        return list(range(len(examples)))
    try:
        kept, _ = train_test_split(
            list(range(len(examples))),
            train_size=max_rows,
            random_state=seed,
            stratify=[e.label for e in examples],
        )
    except ValueError as exc:  # a label with one row, or fewer rows asked than labels
        raise FinloraError(f"cannot sample {max_rows} rows stratified by label ({exc})") from None
    return sorted(kept)


def weighted_draws(rows: Sequence[int], weight: float, seed: int | Sequence[int]) -> list[int]:
    """`rows` drawn `weight` times (sorted): each whole time every row, and for the fraction
    left a sample without replacement fixed by `seed` (numpy's seed: an int or a sequence)."""
    whole = int(weight)
    extra = round((weight - whole) * len(rows))
    sample = np.random.default_rng(seed).choice(len(rows), size=extra, replace=False)
    return sorted([*rows] * whole + [rows[int(k)] for k in sample])


def _source_path(source: DataSource, where: str) -> Path:
    path = Path(source.path).expanduser()
    if not path.exists():
        raise FinloraError(f"config: {where}.path: {path}: no such file or directory")
    return path


def _read_source(source: DataSource, path: Path, labels: list[str], load: Loader) -> list[Example]:
    return load(
        path,
        source.format,
        agreement=source.agreement,
        text_column=source.text_column,
        label_column=source.label_column,
        label_map=source.label_map,
        labels=labels,
    )


def _split_source(
    source: DataSource, rows: list[Example], cfg: DataConfig, seed: int, where: str
) -> tuple[list[Example], Split]:
    """A source's split, its training part sampled to max_rows, and the examples it keeps.

    The split comes first so that validation and test are the same rows whatever max_rows is:
    settings compared on them are compared on the same sentences.
    """
    try:
        split = stratified_split(rows, cfg.test_fraction, cfg.val_fraction, seed)
    except FinloraError as exc:
        raise FinloraError(f"{where} ({source.resolved_name}): {exc}") from None
    if source.max_rows is None or source.max_rows >= len(split.train):
        return rows, split
    train = [rows[i] for i in split.train]
    try:
        kept_train = {split.train[k] for k in sample_rows(train, source.max_rows, seed)}
    except FinloraError as exc:
        raise FinloraError(f"config: {where}.max_rows: {exc}") from None
    kept = sorted(kept_train.union(split.validation, split.test))
    new_index = {old: new for new, old in enumerate(kept)}
    parts = {
        name: tuple(new_index[i] for i in getattr(split, name) if i in new_index)
        for name in SPLIT_NAMES
    }
    return [rows[i] for i in kept], Split(**parts)


def pool_sources(
    cfg: DataConfig, seed: int, load: Loader, files: Callable[[Path, DataSource], list[Path]]
) -> Pooled:
    """Read, split and sample every source of `cfg.sources`, and pool them.

    `load` reads one file with a source's options, `files` names the files a source's path
    reads. Errors name the source's key, e.g. `data.sources[2]`.
    """
    examples: list[Example] = []
    parts: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    slices = []
    for index, source in enumerate(cfg.sources):
        where = f"data.sources[{index}]"
        path = _source_path(source, where)
        loaded = _read_source(source, path, list(cfg.labels), load)
        rows, split = _split_source(source, loaded, cfg, seed, where)
        start = len(examples)
        for name in SPLIT_NAMES:
            parts[name] += [start + i for i in getattr(split, name)]
        examples += rows
        slices.append(
            SourceSlice(
                source.resolved_name,
                path,
                files(path, source),
                start,
                len(examples),
                len(loaded),
                source.max_rows,
                source.weight,
            )
        )
    pooled = Split(**{name: tuple(sorted(parts[name])) for name in SPLIT_NAMES})
    return Pooled(examples, pooled, slices)


def training_draws(train: Sequence[int], sources: Sequence[SourceSlice], seed: int) -> list[int]:
    """The training rows as an epoch draws them: each source's rows of `train`, weighted.

    Each source's fraction is sampled with its own stream of the seed, so that changing one
    source's weight leaves the other sources' draws as they were.
    """
    drawn: list[int] = []
    for index, source in enumerate(sources):
        rows = [i for i in train if i in source.rows]
        drawn += weighted_draws(rows, source.weight, (seed, index))
    return sorted(drawn)
