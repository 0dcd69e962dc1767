"""What `finlora export` checks on an instruct run: next-token logits at the answer tokens.

A classification run is checked on its label scores (classify.py). An instruct run has no labels:
its check reads held-out records (prompt and reference answer) teacher-forced, and compares the
logits that predict each answer token, the ones training shaped, between the adapter model and
the written one; for a GGUF, llama.cpp's log-probabilities of those tokens and its tokenization
of the prompts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finlora.data.instruct import InstructRecord, alpaca_record
from finlora.errors import FinloraError
from finlora.export import llama_cpp as llama_cpp_check
from finlora.runs import Run
from finlora.scoring import label_logits
from finlora.tasks.classify import IGNORE, sorted_batches
from finlora.tasks.instruct import InstructCodec, InstructFeature

# (instruction, input, answer): used to check a run whose training data is no longer here.
FIXED_RECORDS = [
    ("What is EBITDA?", "", "Earnings before interest, taxes, depreciation and amortisation."),
    ("Compute the current ratio.", "Current assets: EUR 5.0 mn. Current liabilities: EUR 4.0 mn.",
     "The current ratio is 5.0 / 4.0 = 1.25."),
    ("What is the sentiment of this news?", "Net sales fell 12 % to EUR 3.1 mn.",
     "Negative: sales fell."),
    ("Define free cash flow.", "", "Operating cash flow minus capital expenditure."),
    ("Summarise the sentence.", "The board proposes a dividend of EUR 0.20 per share.",
     "A EUR 0.20 dividend is proposed."),
]  # fmt: skip
VERIFY_BATCH = 8


@dataclass
class InstructSample:
    records: list[InstructRecord]
    features: list[InstructFeature]  # one per record: prompt and answer, answer tokens targeted
    description: str

    @property
    def tokens(self) -> int:
        return sum(len(f.targets) for f in self.features)


@dataclass
class TokenScores:
    """Per answer token, in `order`: the logits predicting it, their argmax, its log-prob."""

    logits: list[torch.Tensor]  # per batch, (M, V)
    predicted: list[int]
    logp: torch.Tensor  # (M,)


def instruct_sample(run: Run, codec: InstructCodec, n: int | None) -> InstructSample:
    """The run's test records (the first `n`, or all), else a few fixed financial records."""
    try:
        description, records = run.test_rows()
    except FinloraError:  # the data is not here, or not as the run saw it
        records = []
    if not records:
        records = [alpaca_record(i, output, input_text) for i, input_text, output in FIXED_RECORDS]
        description = "fixed instructions (the run's data is not on this machine)"
    pairs = [(r, f) for r in records if (f := codec.encode(r)) is not None][:n]
    return InstructSample([r for r, _ in pairs], [f for _, f in pairs], description)


def _batches(sample: InstructSample) -> Iterator[list[int]]:
    """The records' indices, batched by length as `token_scores` reads them."""
    return sorted_batches([len(f.ids) for f in sample.features], VERIFY_BATCH)


def order(sample: InstructSample) -> list[int]:
    """The records in the order `token_scores` reads them."""
    return [i for idx in _batches(sample) for i in idx]


@torch.no_grad()
def token_scores(model: Any, codec: InstructCodec, sample: InstructSample) -> TokenScores:
    """Teacher-forced logits at every answer token of the sample's records."""
    model.eval()
    logits_out: list[torch.Tensor] = []
    predicted: list[int] = []
    logp: list[torch.Tensor] = []
    for idx in _batches(sample):
        batch = codec.training_batch([sample.features[i] for i in idx])
        logits = label_logits(model, batch, codec.kind, fast=False).float()  # (B, L, V)
        real = batch.targets != IGNORE  # (B, L), row by row: each record's answer in order
        picked = logits[real]  # (M, V)
        logits_out.append(picked)
        predicted += picked.argmax(-1).tolist()
        logp.append(torch.log_softmax(picked, -1).gather(1, batch.targets[real][:, None])[:, 0])
    return TokenScores(logits_out, predicted, torch.cat(logp))


def gguf_token_check(
    path: Path, codec: InstructCodec, sample: InstructSample, reference: TokenScores
) -> llama_cpp_check.Agreement:
    """llama.cpp on the GGUF against the adapter model, on the same token sequences: how often
    their most likely next token is the same, and their answer tokens' log-probabilities."""
    width = max(len(f.ids) for f in sample.features)
    scorer = llama_cpp_check.LlamaCppTokens(path, width + 8)
    predicted: list[int] = []
    logp: list[np.ndarray] = []
    same_tokens = 0
    try:
        for i in order(sample):
            feature = sample.features[i]
            rows = scorer.logp(feature.ids, [t - 1 for t in feature.targets])  # (P, V)
            predicted += rows.argmax(-1).tolist()
            logp.append(rows[np.arange(len(rows)), [feature.ids[t] for t in feature.targets]])
            text = codec.prompt_text(sample.records[i])
            same_tokens += scorer.tokenize(text) == _hf_tokens(codec, text)
    finally:
        scorer.close()
    diff = np.abs(np.concatenate(logp) - reference.logp.double().numpy()).max()
    return llama_cpp_check.Agreement(
        agreement(reference.predicted, predicted), same_tokens / len(sample.features), float(diff)
    )


def _hf_tokens(codec: InstructCodec, text: str) -> list[int]:
    return list(codec.tokenizer(text, add_special_tokens=False)["input_ids"])


def agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    return sum(a == b for a, b in zip(reference, candidate, strict=True)) / len(reference)
