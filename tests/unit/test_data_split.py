"""Stratified splits: sizes, stratification, determinism, rare classes, duplicate report."""

from __future__ import annotations

from collections import Counter

import pytest

from finlora.data import Example, Split, cross_split_duplicates, stratified_split
from finlora.errors import FinloraError


def make(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label) for label, n in counts.items() for i in range(n)]


def test_sizes_stratification_and_partition() -> None:
    examples = make({"negative": 20, "neutral": 120, "positive": 60})
    split = stratified_split(examples, test_fraction=0.1, val_fraction=0.1, seed=0)
    assert (len(split.train), len(split.validation), len(split.test)) == (162, 18, 20)
    everything = split.train + split.validation + split.test
    assert sorted(everything) == list(range(200))
    for part in (split.train, split.validation, split.test):
        assert list(part) == sorted(part)
    assert Counter(examples[i].label for i in split.test) == {
        "negative": 2,
        "neutral": 12,
        "positive": 6,
    }


def test_deterministic_by_seed() -> None:
    examples = make({"negative": 20, "neutral": 60, "positive": 40})
    first = stratified_split(examples, seed=3)
    assert stratified_split(examples, seed=3) == first
    assert stratified_split(examples, seed=4) != first


def test_zero_validation() -> None:
    examples = make({"negative": 5, "neutral": 40})
    split = stratified_split(examples, test_fraction=0.2, val_fraction=0.0)
    assert split.validation == ()
    assert (len(split.train), len(split.test)) == (36, 9)


@pytest.mark.parametrize(
    ("counts", "test_fraction", "val_fraction", "message"),
    [
        (
            {"negative": 2, "neutral": 20, "positive": 20},
            0.1,
            0.1,
            "split leaves class 'negative' without examples in validation "
            "(it has 2 examples; need at least 12)",
        ),
        (
            {"negative": 1, "neutral": 20, "positive": 20},
            0.1,
            0.1,
            "split leaves class 'negative' without examples in test "
            "(it has 1 example; need at least 10)",
        ),
        (
            {"negative": 2, "neutral": 2, "positive": 2},
            0.34,
            0.5,
            "split leaves class 'negative' without examples in validation "
            "(it has 2 examples; need at least 4)",
        ),
    ],
)
def test_rare_class_is_named(
    counts: dict[str, int], test_fraction: float, val_fraction: float, message: str
) -> None:
    with pytest.raises(FinloraError) as err:
        stratified_split(make(counts), test_fraction, val_fraction)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("test_fraction", "val_fraction", "message"),
    [
        (0.0, 0.1, "test_fraction must be in (0, 1), got 0.0"),
        (1.0, 0.1, "test_fraction must be in (0, 1), got 1.0"),
        (0.1, -0.1, "val_fraction must be in [0, 1), got -0.1"),
        (0.1, 1.0, "val_fraction must be in [0, 1), got 1.0"),
    ],
)
def test_fraction_validation(test_fraction: float, val_fraction: float, message: str) -> None:
    with pytest.raises(FinloraError) as err:
        stratified_split(make({"a": 10, "b": 10}), test_fraction, val_fraction)
    assert str(err.value) == message


def test_empty_examples() -> None:
    with pytest.raises(FinloraError, match="empty example list"):
        stratified_split([])


def test_split_dict_round_trip_and_validation() -> None:
    split = Split(train=(0, 2, 5), validation=(1,), test=(3, 4))
    data = split.to_dict()
    assert data == {"train": [0, 2, 5], "validation": [1], "test": [3, 4]}
    assert Split.from_dict(data) == split
    assert Split.from_dict({"train": [5, 0], "validation": [], "test": [1]}).train == (0, 5)
    with pytest.raises(FinloraError, match="split: missing validation"):
        Split.from_dict({"train": [0], "test": [1]})
    with pytest.raises(FinloraError, match="split: index 1 is in both train and test"):
        Split.from_dict({"train": [0, 1], "validation": [], "test": [1]})
    with pytest.raises(FinloraError, match="split: train indices are not sorted"):
        Split(train=(2, 1), validation=(), test=(0,))


def test_cross_split_duplicates() -> None:
    examples = [
        Example("Same .", "neutral"),
        Example("Other .", "neutral"),
        Example(" Same . ", "neutral"),
        Example("Twice in train .", "positive"),
        Example("Twice in train .", "positive"),
        Example("Dup B", "negative"),
        Example("Dup B", "negative"),
    ]
    split = Split(train=(2, 3, 4, 6), validation=(1, 5), test=(0,))
    assert cross_split_duplicates(examples, split) == [
        {"text": "Same .", "splits": ["train", "test"]},
        {"text": "Dup B", "splits": ["train", "validation"]},
    ]


def test_conflicting_labels_are_found_in_order() -> None:
    from finlora.data.split import conflicting_labels

    examples = [Example("A", "x"), Example("B", "x"), Example("A ", "y"), Example("B", "x"),
                Example("C", "y"), Example("C", "z")]  # fmt: skip
    assert conflicting_labels(examples) == ["A", "C"]
