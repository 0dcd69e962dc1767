"""What `finlora export` checks on a classification run: the label scores.

The written model must give the adapter model's logits at the positions that predict label
tokens, on the run's test sentences; for a GGUF, llama.cpp scores the same labels from its own
tokenization of each sentence. An instruct run is checked in instruct.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finlora.errors import FinloraError
from finlora.export import llama_cpp as llama_cpp_check
from finlora.runs import Run
from finlora.scoring import label_logits, sequence_logprob
from finlora.tasks.classify import IGNORE, LabelCodec, sorted_batches

# Used to check a run whose training data is no longer on this machine.
FIXED_SENTENCES = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007.",
    "Net sales decreased by 12 % to EUR 3.1 mn.",
    "The company will hold its annual general meeting in Helsinki on 25 March.",
    "Pretax loss totalled EUR 117 mn compared to a profit of EUR 5 mn a year earlier.",
    "The order is valued at some EUR 2 mn.",
    "Sales in Finland increased by 10.5 % in January.",
    "The board proposes a dividend of EUR 0.20 per share.",
    "Shares of the company fell 8 % after the profit warning.",
]
VERIFY_BATCH = 8


@dataclass
class LabelSample:
    texts: list[str]
    gold: list[int] | None  # label indices, where the sentences come from the test split
    description: str


@dataclass
class LabelScores:
    logits: list[torch.Tensor]  # per batch, label-position logits at real targets (M, V)
    labels: list[int]  # predicted label index per prompt, in prompt order
    loglik: torch.Tensor  # label log-likelihoods, (N, K) in prompt order


def label_sample(run: Run, codec: LabelCodec, n: int | None) -> LabelSample:
    """The run's test sentences (the first `n`, or all), else a few fixed financial sentences."""
    try:
        description, rows = run.test_rows()
    except FinloraError:  # the data is not here, or not as the run saw it
        texts = FIXED_SENTENCES[:n]
        return LabelSample(texts, None, "fixed sentences (the run's data is not on this machine)")
    rows = rows[:n]
    gold = [codec.labels.index(e.label) for e in rows]
    return LabelSample([e.text for e in rows], gold, description)


@torch.no_grad()
def label_scores(model: Any, codec: LabelCodec, prompts: Sequence[list[int]]) -> LabelScores:
    """Logits at the positions that predict label tokens, and the label each prompt gets."""
    model.eval()
    logits_out: list[torch.Tensor] = []
    labels = [0] * len(prompts)
    all_loglik = torch.zeros(len(prompts), len(codec.labels))
    for idx in sorted_batches([len(p) for p in prompts], VERIFY_BATCH):
        batch = codec.scoring_batch([prompts[i] for i in idx])
        logits = label_logits(model, batch, codec.kind, fast=False).float()  # (B', L, V)
        if codec.single_token_labels:
            label_ids = torch.tensor([ids[0] for ids in codec.label_ids])
            loglik = torch.log_softmax(logits[:, 0], dim=-1)[:, label_ids]  # (B, K)
            logits_out.append(logits[:, 0])
        else:
            loglik = sequence_logprob(logits, batch.targets).view(len(idx), -1)  # (B, K)
            logits_out.append(logits[batch.targets != IGNORE])
        all_loglik[idx] = loglik
        for i, row in zip(idx, loglik.argmax(-1).tolist(), strict=True):
            labels[i] = row
    return LabelScores(logits_out, labels, all_loglik)


def compare_scores(reference: LabelScores, candidate: LabelScores) -> tuple[float, float]:
    """(max |logit diff|, fraction of equal labels)."""
    diff = max(
        float((a - b).abs().max()) for a, b in zip(reference.logits, candidate.logits, strict=True)
    )
    same = sum(a == b for a, b in zip(reference.labels, candidate.labels, strict=True))
    return diff, same / len(reference.labels)


def accuracy(labels: Sequence[int], gold: list[int] | None) -> float | None:
    return (
        None if gold is None else sum(a == b for a, b in zip(labels, gold, strict=True)) / len(gold)
    )


def gguf_label_check(
    path: Path, codec: LabelCodec, sample: LabelSample, reference: LabelScores
) -> llama_cpp_check.Agreement:
    """llama.cpp's labels (its own tokenization included) against the adapter model's."""
    scorer = llama_cpp_check.LlamaCppScorer(path, codec)
    labels: list[int] = []
    same_tokens, diff = 0, 0.0
    try:
        for i, text in enumerate(sample.texts):
            ids = scorer.encode_text(text)
            loglik = scorer.label_loglik(ids)  # (K,)
            labels.append(int(loglik.argmax()))
            if ids == codec.encode_text(text):
                same_tokens += 1
                diff = max(diff, float(abs(loglik - reference.loglik[i].numpy()).max()))
    finally:
        scorer.close()
    n = len(labels)
    agree = sum(a == b for a, b in zip(labels, reference.labels, strict=True)) / n
    return llama_cpp_check.Agreement(
        agree, same_tokens / n, diff if same_tokens else None, accuracy(labels, sample.gold)
    )
