"""Data: loaders (FPB, CSV / TSV / JSON Lines), a synthetic set, and stratified splits."""

from finlora.data.examples import Example
from finlora.data.loaders import (
    FPB_FILES,
    FPB_LABELS,
    load_examples,
    load_fpb,
    load_table,
    parse_label_map,
    read_text,
)
from finlora.data.split import Split, cross_split_duplicates, stratified_split
from finlora.data.synthetic import SYNTHETIC_NOTE, synthetic_sentiment

__all__ = [
    "FPB_FILES",
    "FPB_LABELS",
    "SYNTHETIC_NOTE",
    "Example",
    "Split",
    "cross_split_duplicates",
    "load_examples",
    "load_fpb",
    "load_table",
    "parse_label_map",
    "read_text",
    "stratified_split",
    "synthetic_sentiment",
]
