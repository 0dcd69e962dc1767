"""Leakage between a run's training and test rows: texts a test row repeats from training,
exactly or once the differences that do not change what a text says are set aside."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from finlora.data.examples import Example
from finlora.data.split import Split

NORMALISED = "case, whitespace, URLs, $TICKER symbols and punctuation set aside"

_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
# A cashtag starts with a letter: "$AAPL", "$BRK.B"; "$3.1" is an amount and stays.
_TICKER = re.compile(r"\$[A-Za-z][A-Za-z0-9.]*")


def normalise(text: str) -> str:
    """The text's letters and digits, casefolded, after URLs and $TICKER symbols are removed.

    Whitespace goes too, so that "profit rose ." (Financial PhraseBank's tokenised spelling)
    and "profit rose." compare equal.
    """
    text = _TICKER.sub(" ", _URL.sub(" ", unicodedata.normalize("NFKC", text)))
    return "".join(c for c in text.casefold() if c.isalnum())


@dataclass(frozen=True)
class LeakGroup:
    """Test rows and the training rows whose text they repeat (one normalised text)."""

    text: str  # the first test row's text
    train: tuple[int, ...]
    test: tuple[int, ...]
    exact: tuple[int, ...]  # the test rows whose stripped text a training row has as is

    @property
    def kind(self) -> str:
        return "exact" if self.exact else "near"


@dataclass(frozen=True)
class Leakage:
    """Every leak of a split, and the training rows dropped for them (data.dedup)."""

    groups: tuple[LeakGroup, ...]
    dedup: bool = False

    @property
    def exact_test_rows(self) -> set[int]:
        return {i for g in self.groups for i in g.exact}

    @property
    def near_test_rows(self) -> set[int]:
        return {i for g in self.groups for i in g.test if i not in g.exact}

    @property
    def dropped(self) -> set[int]:
        """The training rows left out of the split (none without data.dedup)."""
        return {i for g in self.groups for i in g.train} if self.dedup else set()

    def counts(self, rows: range | None = None) -> dict[str, int]:
        """Test rows with an exact and with only a near duplicate in training, and training
        rows dropped; only those among `rows` (one source's) when given."""
        within = (lambda i: i in rows) if rows is not None else (lambda i: True)
        return {
            "exact": sum(1 for i in self.exact_test_rows if within(i)),
            "near": sum(1 for i in self.near_test_rows if within(i)),
            "dropped_from_train": sum(1 for i in self.dropped if within(i)),
        }

    def to_dict(self, source_of: Callable[[int], str] | None = None) -> dict[str, Any]:
        """split.json's `leakage`; `source_of` names the source of a row, for a pooled run."""

        def group(g: LeakGroup) -> dict[str, Any]:
            entry: dict[str, Any] = {"kind": g.kind, "text": g.text}
            if source_of is not None:
                entry["sources"] = sorted({source_of(i) for i in (*g.train, *g.test)})
            return {**entry, "train": list(g.train), "test": list(g.test)}

        return {
            "compared": f"training rows against test rows, {NORMALISED}",
            "dedup": self.dedup,
            **self.counts(),
            "groups": [group(g) for g in self.groups],
        }


def find_leakage(examples: Sequence[Example], split: Split, dedup: bool = False) -> Leakage:
    """The test rows of `split` whose normalised text a training row has, grouped by that
    text in order of the first test row. Texts with no letter or digit are never matched."""
    train: dict[str, list[int]] = {}
    for i in split.train:
        key = normalise(examples[i].text)
        if key:
            train.setdefault(key, []).append(i)
    tests: dict[str, list[int]] = {}
    for i in split.test:
        key = normalise(examples[i].text)
        if key in train:
            tests.setdefault(key, []).append(i)
    groups = []
    for key, test_rows in tests.items():
        train_texts = {examples[i].text.strip() for i in train[key]}
        exact = tuple(i for i in test_rows if examples[i].text.strip() in train_texts)
        groups.append(
            LeakGroup(examples[test_rows[0]].text, tuple(train[key]), tuple(test_rows), exact)
        )
    return Leakage(tuple(groups), dedup)


def without_leaks(split: Split, leakage: Leakage) -> Split:
    """`split` with the training rows that leakage.dedup drops left out."""
    dropped = leakage.dropped
    return replace(split, train=tuple(i for i in split.train if i not in dropped))
