"""Synthetic sentiment set: determinism, class balance, labels, sources."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from finlora.data import FPB_LABELS, stratified_split, synthetic_sentiment
from finlora.errors import FinloraError


def test_same_seed_same_list() -> None:
    assert synthetic_sentiment(200, seed=5) == synthetic_sentiment(200, seed=5)
    assert synthetic_sentiment(200, seed=5) != synthetic_sentiment(200, seed=6)


def test_class_balance_and_sources() -> None:
    examples = synthetic_sentiment()
    assert len(examples) == 600
    assert Counter(e.label for e in examples) == {"negative": 90, "neutral": 360, "positive": 150}
    assert {e.label for e in examples} <= set(FPB_LABELS)
    assert [e.source for e in examples[:3]] == ["synthetic:0", "synthetic:1", "synthetic:2"]


def test_sentences_are_filled_and_varied() -> None:
    examples = synthetic_sentiment(600, seed=0)
    texts = [e.text for e in examples]
    assert not any("{" in text or "}" in text for text in texts)
    assert all(text[0].isupper() and text.endswith(" .") for text in texts)
    assert len(set(texts)) >= 590
    # templates differ within each class: count distinct sentence "shapes" (digits removed,
    # first three words kept)
    for label in FPB_LABELS:
        shapes = {
            " ".join(re.sub(r"[\d.]+", "#", e.text).split()[1:4])
            for e in examples
            if e.label == label
        }
        assert len(shapes) >= 12, label


def test_small_sets_split_cleanly() -> None:
    split = stratified_split(synthetic_sentiment(200, seed=1))
    assert (len(split.train), len(split.validation), len(split.test)) == (162, 18, 20)


def test_size_must_be_positive() -> None:
    with pytest.raises(FinloraError, match="synthetic set size must be positive, got 0"):
        synthetic_sentiment(0)
