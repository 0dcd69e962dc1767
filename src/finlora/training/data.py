"""The data a run trains on, as its codec's features, with what is worth saying about it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finlora.config import RunConfig
from finlora.data.loaders import repair_note
from finlora.data.prepare import PreparedData, PreparedInstruct
from finlora.data.split import conflicting_labels
from finlora.tasks import Codec
from finlora.training.packing import check_packing, pack

Log = Callable[[str], None]


def log_data(data: PreparedData | PreparedInstruct, log: Log) -> None:
    """Say what the data is and how it split, and what in it deserves a look (texts repaired
    on reading, texts in several splits, texts with several labels)."""
    sizes = {name: len(getattr(data.split, name)) for name in ("train", "validation", "test")}
    log(f"data: {data.description} -> {sizes}")
    if isinstance(data, PreparedData):
        _log_sources(data, log)
    if data.duplicates:
        log(f"data: {len(data.duplicates)} exact duplicate text(s) appear in more than one split")
    if isinstance(data, PreparedData) and data.leakage is not None:
        counts = data.leakage.counts()
        if counts["exact"] or counts["near"]:
            log(
                f"data: {counts['exact']} test row(s) repeat a training row's text exactly and "
                f"{counts['near']} nearly (split.json: leakage); "
                + (
                    f"{counts['dropped_from_train']} training row(s) dropped (data.dedup)"
                    if data.leakage.dedup
                    else "data.dedup=true drops them from training"
                )
            )
    if isinstance(data, PreparedData):
        repaired = repair_note(data.examples)
        if repaired:
            log(f"data: {repaired}")
        conflicts = conflicting_labels(data.examples)
        if conflicts:
            log(
                f"data: {len(conflicts)} text(s) appear with different labels, e.g. "
                f"{conflicts[0][:80]!r}"
            )


def _log_sources(data: PreparedData, log: Log) -> None:
    draws = data.train_draws if data.train_draws is not None else data.split.train
    for source in data.sources:
        sizes = {
            name: sum(1 for i in getattr(data.split, name) if i in source.rows)
            for name in ("train", "validation", "test")
        }
        drawn = sum(1 for i in draws if i in source.rows)
        log(
            f"data: {source.name}: {len(source.rows)} of {source.loaded} rows -> {sizes}; "
            f"weight {source.weight:g}: {drawn} training draws an epoch"
        )


def encode_split(codec: Codec, rows: list[Any], split: str, log: Log) -> list[Any]:
    """`rows` of one split as the codec's features, saying what was cut or skipped to fit
    data.max_length."""
    cut_before = codec.overflow.count
    features = [codec.encode(row) for row in rows]
    note = codec.overflow.note(cut_before, len(rows), f"{split} record(s)", codec.max_length)
    if note:
        log(f"data: {note}")
    kept = [f for f in features if f is not None]
    if len(kept) < len(features):
        # Only instruction records can lose every answer token to data.max_length.
        log(
            f"data: {len(features) - len(kept)} {split} record(s) skipped: the prompt fills "
            "data.max_length and leaves no answer token to train on"
        )
    return kept


def training_features(codec: Codec, rows: list[Any], cfg: RunConfig, log: Log) -> list[Any]:
    """The training split as the codec's features (`encode_split`), packed several to a
    sequence under train.packing; raises FinloraError where packing cannot apply."""
    if cfg.train.packing:
        check_packing(codec)
    features = encode_split(codec, rows, "train", log)
    if not cfg.train.packing or not features:
        return features
    packed = pack(features, codec.max_length)
    tokens = sum(codec.width(f) for f in features)
    log(
        f"data: {len(features)} train record(s) packed into {len(packed)} sequence(s) of at "
        f"most {codec.max_length} tokens ({tokens / (len(packed) * codec.max_length):.0%} full)"
    )
    return packed
