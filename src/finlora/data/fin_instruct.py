"""The packaged financial instruction set: a small, labelled-as-such set for demos and tests.

Two parts, both shipped with finlora and needing no download:
- sentiment questions about invented news sentences (finlora's synthetic generator), answered in
  words that name exactly one label, so `finlora eval` can check label answers;
- questions on financial concepts, small worked calculations and rewrites, written by hand for
  finlora (`fin_concepts.jsonl`).
It is not real data; reports name it as such.
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources

from finlora.data.instruct import InstructRecord, alpaca_record
from finlora.data.loaders import FPB_LABELS
from finlora.data.synthetic import synthetic_sentiment

FIN_INSTRUCT_NOTE = (
    "finlora packaged financial instruction set (generated sentiment questions and authored "
    "Q&A; not real data)"
)
SENTIMENT_QUESTIONS = 150

_INSTRUCTIONS = (
    "What is the sentiment of this financial news sentence for the company's investors?",
    "Classify the sentiment of the following financial news as negative, neutral or positive.",
    "Read the sentence from a company announcement. Is it good, bad or neither for shareholders?",
    "How would an equity analyst read this news: positive, negative or neutral? Explain briefly.",
    "Give the sentiment of this headline and a one-line reason.",
)

# Each answer names its label once and no other label, so a label check can read it back.
_ANSWERS: dict[str, tuple[str, ...]] = {
    "positive": (
        "Positive. The news points to stronger results or prospects for the company.",
        "The sentiment is positive: this is good news for the company's shareholders.",
        "Positive, because it reports an improvement that supports the company's value.",
    ),
    "negative": (
        "Negative. The news points to weaker results or higher risk for the company.",
        "The sentiment is negative: this is bad news for the company's shareholders.",
        "Negative, because it reports a deterioration that weighs on the company's value.",
    ),
    "neutral": (
        "Neutral. The sentence states a fact with no clear effect on the company's value.",
        "The sentiment is neutral: it reports information that neither helps nor hurts "
        "shareholders.",
        "Neutral, because it describes the business without signalling better or worse results.",
    ),
}


def _sentiment_questions(n: int, seed: int) -> list[InstructRecord]:
    rng = random.Random(seed)
    # A seed other than the classifier's synthetic set, so the two sets share no sentence.
    sentences = synthetic_sentiment(n, seed=seed + 1)
    return [
        alpaca_record(
            rng.choice(_INSTRUCTIONS),
            rng.choice(_ANSWERS[e.label]),
            e.text,
            source=f"finlora:sentiment:{i}",
            label=e.label,
            labels=FPB_LABELS,
        )
        for i, e in enumerate(sentences)
    ]


def _concepts() -> list[InstructRecord]:
    text = (resources.files("finlora") / "data" / "fin_concepts.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [
        alpaca_record(r["instruction"], r["output"], r.get("input", ""), f"finlora:concepts:{i}")
        for i, r in enumerate(rows)
    ]


def records_sha256(records: list[InstructRecord]) -> str:
    """A digest of records' content, to notice a packaged set that changed between versions."""
    content = [[(m.role, m.content) for m in r.messages] + [r.label] for r in records]
    return hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()


def fin_instruct_set(seed: int = 0) -> list[InstructRecord]:
    """The packaged set: sentiment questions, then the authored records; deterministic."""
    return _sentiment_questions(SENTIMENT_QUESTIONS, seed) + _concepts()
