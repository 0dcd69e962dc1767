"""Stratified train / validation / test splits, stored as index lists, and a duplicate report."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from sklearn.model_selection import train_test_split

from finlora.data.examples import Example
from finlora.errors import FinloraError

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    """Indices into an example list, each tuple sorted; no index is in two splits.

    Raises FinloraError when built with unsorted or overlapping indices.
    """

    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for name in SPLIT_NAMES:
            indices = getattr(self, name)
            if list(indices) != sorted(indices):
                raise FinloraError(f"split: {name} indices are not sorted")
            for index in indices:
                if index in seen:
                    raise FinloraError(f"split: index {index} is in both {seen[index]} and {name}")
                seen[index] = name

    def to_dict(self) -> dict[str, list[int]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[int]]) -> Split:
        """Build a Split from `to_dict` output; raises FinloraError on a missing or bad key."""
        missing = [name for name in SPLIT_NAMES if name not in d]
        if missing:
            raise FinloraError(f"split: missing {', '.join(missing)} (keys: {', '.join(d)})")
        try:
            parts = {name: tuple(sorted(int(i) for i in d[name])) for name in SPLIT_NAMES}
        except (TypeError, ValueError) as err:
            raise FinloraError(f"split: indices must be integers ({err})") from None
        return cls(**parts)


def _check_fractions(test_fraction: float, val_fraction: float) -> None:
    if not 0 < test_fraction < 1:
        raise FinloraError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= val_fraction < 1:
        raise FinloraError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _missing_class(name: str, label: str, counts: Counter[str], shares: dict[str, float]) -> str:
    # a class with count * share >= 1 always gets one example under stratified rounding;
    # and every split needs at least one, so this is the count that makes the split work
    need = max(len(shares), math.ceil(1 / shares[name] - 1e-9))
    return (
        f"split leaves class '{label}' without examples in {name} "
        f"(it has {counts[label]} example{'' if counts[label] == 1 else 's'}; "
        f"need at least {need})"
    )


def _cut(
    indices: list[int],
    labels: Sequence[str],
    fraction: float,
    seed: int,
    fail: str,
) -> tuple[list[int], list[int]]:
    try:
        kept, taken = train_test_split(
            indices,
            test_size=fraction,
            random_state=seed,
            stratify=[labels[i] for i in indices],
        )
    except ValueError:
        # sklearn refuses when a class has one member or a split is smaller than the class count
        raise FinloraError(fail) from None
    return list(kept), list(taken)


def stratified_split(
    examples: Sequence[Example],
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Split:
    """Split examples by label: `test_fraction` of all to test, `val_fraction` of the rest to
    validation (0 for none), the remainder to train; deterministic for a given `seed`.

    Raises FinloraError on fractions out of range or when a class cannot appear in every split.
    """
    _check_fractions(test_fraction, val_fraction)
    if not examples:
        raise FinloraError("cannot split an empty example list")
    labels = [example.label for example in examples]
    counts = Counter(labels)
    shares = {"test": test_fraction, "train": (1 - test_fraction) * (1 - val_fraction)}
    if val_fraction > 0:
        shares["validation"] = (1 - test_fraction) * val_fraction
    rarest = min(sorted(counts), key=counts.__getitem__)

    rest, test = _cut(
        list(range(len(examples))),
        labels,
        test_fraction,
        seed,
        _missing_class("test", rarest, counts, shares),
    )
    train, validation = rest, list[int]()
    if val_fraction > 0:
        train, validation = _cut(
            rest,
            labels,
            val_fraction,
            seed,
            _missing_class("validation", rarest, counts, shares),
        )
    parts = {"train": train, "validation": validation, "test": test}
    # stratification rounds per class, so a rare class can still end up absent from a split;
    # check the smallest splits first, since they are the ones a rare class misses
    for name in sorted(shares, key=shares.__getitem__):
        present = {labels[i] for i in parts[name]}
        for label in sorted(counts):
            if label not in present:
                raise FinloraError(_missing_class(name, label, counts, shares))
    return Split(**{name: tuple(sorted(parts[name])) for name in SPLIT_NAMES})


def cross_split_duplicates(examples: Sequence[Example], split: Split) -> list[dict[str, object]]:
    """Texts (compared after strip) that occur in more than one split, in order of first
    appearance, each as {"text": ..., "splits": [names in train/validation/test order]}.
    """
    where: dict[str, set[str]] = {}
    first: dict[str, int] = {}
    for name in SPLIT_NAMES:
        for index in getattr(split, name):
            text = examples[index].text.strip()
            where.setdefault(text, set()).add(name)
            first[text] = min(first.get(text, index), index)
    return [
        {"text": text, "splits": [name for name in SPLIT_NAMES if name in where[text]]}
        for text in sorted(where, key=first.__getitem__)
        if len(where[text]) > 1
    ]


def conflicting_labels(examples: Sequence[Example]) -> list[str]:
    """Texts (compared after strip) that the data gives more than one label, in order of first
    appearance: the model is taught both, and one of them is scored wrong whatever it says."""
    labels: dict[str, set[str]] = {}
    for e in examples:
        labels.setdefault(e.text.strip(), set()).add(e.label)
    return [text for text, found in labels.items() if len(found) > 1]
