"""Classification as generation: prompts, verbalised labels, and the batches built from them.

A sentence becomes `prompt(text)`; its label becomes the token ids of the verbalised label
(e.g. " positive"). Training teaches the model those label tokens after the prompt; scoring
compares the log-likelihood of every label's tokens, so a prediction is always a valid label
with a probability.

An encoder classifier has no vocabulary to verbalise into: it reads the bare sentence (with
its tokenizer's [CLS]/[SEP]) and its head has one logit per label, so label k's "token" is k.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from finlora.config import DataConfig
from finlora.data import Example
from finlora.errors import FinloraError
from finlora.prompts import PromptTemplate

IGNORE = -100


@dataclass(frozen=True)
class Feature:
    prompt_ids: list[int]
    label: int  # index into LabelCodec.labels


@dataclass
class Batch:
    """Tensors for one step. Causal: prompt and label share `input_ids`; seq2seq: they do not."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    # Causal: positions whose next-token prediction is a label token, -1 for padding. (B, L)
    positions: torch.Tensor
    targets: torch.Tensor  # (B, L) label token ids, IGNORE for padding
    real_tokens: int  # non-pad tokens in the batch, for throughput figures
    # Packed rows (several records each): positions that restart at every record, from which
    # the model builds a causal mask that keeps records apart; None: one record a row. (B, T)
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.positions.to(device),
            self.targets.to(device),
            self.real_tokens,
            None if self.position_ids is None else self.position_ids.to(device),
        )


@dataclass
class Overflow:
    """Inputs a codec cut to fit `data.max_length`: the token count of each, in order.

    Counted as they are encoded, so a caller can say so (training logs it per split, predict
    warns) instead of scoring or training on shortened text unawares.
    """

    lengths: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths, default=0)

    def add(self, tokens: int) -> None:
        self.lengths.append(tokens)

    def note(
        self,
        since: int,
        total: int,
        what: str,
        max_length: int,
        fix: str = "raise data.max_length to keep them whole",
    ) -> str | None:
        """A line on the inputs cut since the count was `since`, ending with `fix`; None if
        there were none."""
        cut = self.lengths[since:]
        if not cut:
            return None
        return (
            f"{len(cut)} of {total} {what} longer than data.max_length={max_length} allows "
            f"were cut to fit (the longest has {max(cut)} tokens); {fix}"
        )


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer rows to the longest one. (B, T)"""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class LabelCodec:
    """Turns examples into features and features into padded batches for one label set."""

    def __init__(
        self,
        tokenizer: Any,
        template: PromptTemplate,
        labels: Sequence[str],
        kind: str,
        max_length: int = 128,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.labels = list(labels)
        self.kind = kind
        self.max_length = max_length
        self.pad_id = int(tokenizer.pad_token_id)
        self.overflow = Overflow()
        if kind == "encoder":
            self._before, self._after = [], []
            self.label_ids = [[k] for k in range(len(self.labels))]
            self.max_label_len = 1
            self._text_budget = max_length
            return
        before, after = template.parts(self.labels)
        self._before = self._encode(before)
        self._after = self._encode(after)
        self.label_ids = [self._encode(template.verbalize(label)) for label in self.labels]
        if kind == "seq2seq" and tokenizer.eos_token_id is not None:
            # T5-style targets end with </s>, as in the model's own pre-training.
            self.label_ids = [ids + [tokenizer.eos_token_id] for ids in self.label_ids]
        if any(not ids for ids in self.label_ids):
            raise FinloraError("template: a label verbalises to no tokens")
        if len({tuple(ids) for ids in self.label_ids}) != len(self.labels):
            raise FinloraError(f"labels {self.labels} do not tokenize to distinct token sequences")
        self._check_no_prefix_labels()
        self.max_label_len = max(len(ids) for ids in self.label_ids)
        budget = max_length - len(self._before) - len(self._after)
        if kind == "causal":
            budget -= self.max_label_len
        elif kind == "seq2seq" and tokenizer.eos_token_id is not None:
            budget -= 1  # the encoder input's closing </s>
        if budget < 4:
            raise FinloraError(f"data.max_length={max_length} leaves no room for the text")
        self._text_budget = budget

    def _check_no_prefix_labels(self) -> None:
        """A label whose tokens begin with another label's whole can never be predicted: its
        log-likelihood is the shorter one's plus a log-probability <= 0 (labels of a causal
        model end with no end token to tell them apart)."""
        for short, long in itertools.permutations(zip(self.labels, self.label_ids, strict=True), 2):
            if len(short[1]) < len(long[1]) and long[1][: len(short[1])] == short[1]:
                raise FinloraError(
                    f"label {long[0]!r} starts with the tokens of label {short[0]!r}, so it can "
                    f"never score above it and would never be predicted; rename one of them "
                    f"(e.g. with data.label_map)"
                )

    @classmethod
    def for_data(
        cls, tokenizer: Any, data: DataConfig, labels: Sequence[str], kind: str
    ) -> LabelCodec:
        """The codec a run's data section describes: its template and max length."""
        return cls(tokenizer, PromptTemplate.load(data.template), labels, kind, data.max_length)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def prompt_ids(self) -> tuple[list[int], list[int]]:
        """The ids put before and after a text's own (each part tokenized alone)."""
        return list(self._before), list(self._after)

    @property
    def single_token_labels(self) -> bool:
        """One forward pass per prompt scores every label (an encoder's head always does)."""
        return self.kind == "encoder" or (self.kind == "causal" and self.max_label_len == 1)

    @property
    def prompt_only(self) -> bool:
        """The model reads the prompt alone: labels are decoder targets or head outputs."""
        return self.kind in ("seq2seq", "encoder")

    def encode_text(self, text: str) -> list[int]:
        """Prompt token ids for `text`, the text cut to fit `max_length`."""
        if self.kind == "encoder":
            encoded = self.tokenizer(text, truncation=True, max_length=self.max_length)
            if len(encoded["input_ids"]) == self.max_length:  # full: was anything cut?
                whole = len(self._encode(text)) + self.tokenizer.num_special_tokens_to_add()
                if whole > self.max_length:
                    self.overflow.add(whole)
            return list(encoded["input_ids"])
        text_ids = self._encode(text)
        if len(text_ids) > self._text_budget:
            # The max_length that would have kept it whole.
            self.overflow.add(len(text_ids) + self.max_length - self._text_budget)
        ids = self._before + text_ids[: self._text_budget] + self._after
        if self.kind == "seq2seq" and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def encode(self, example: Example) -> Feature:
        if example.label not in self.labels:
            raise FinloraError(f"{example.source}: unknown label {example.label!r}")
        return Feature(self.encode_text(example.text), self.labels.index(example.label))

    # ---- batches --------------------------------------------------------------------------

    def width(self, feature: Feature) -> int:
        """Padded width of the feature's training row: causal rows carry their label tokens."""
        extra = 0 if self.prompt_only else self.target_count(feature)
        return len(feature.prompt_ids) + extra

    def target_count(self, feature: Feature) -> int:
        return len(self.label_ids[feature.label])

    def collate(self, pairs: Sequence[tuple[list[int], list[int]]]) -> Batch:
        """Batch (prompt ids, label ids) pairs with padding to the longest row only."""
        if self.prompt_only:
            prompts = [p for p, _ in pairs]
            input_ids = pad_rows(prompts, self.pad_id)
            targets = pad_rows([t for _, t in pairs], IGNORE)
            positions = torch.zeros_like(targets)
            real = sum(len(p) + len(t) for p, t in pairs)
        else:
            rows = [p + t for p, t in pairs]
            input_ids = pad_rows(rows, self.pad_id)
            # The token at position i predicts token i+1: label token j is predicted at
            # position len(prompt) - 1 + j.
            positions = pad_rows([[len(p) - 1 + j for j in range(len(t))] for p, t in pairs], -1)
            targets = pad_rows([list(t) for _, t in pairs], IGNORE)
            real = sum(len(r) for r in rows)
        mask = pad_rows([[1] * len(p if self.prompt_only else p + t) for p, t in pairs], 0)
        return Batch(input_ids, mask, positions, targets, real)

    def training_batch(self, features: Sequence[Feature]) -> Batch:
        return self.collate([(f.prompt_ids, self.label_ids[f.label]) for f in features])

    def scoring_batch(self, prompts: Sequence[list[int]]) -> Batch:
        """Every (prompt, label) pair, prompt-major: row i*K + k is prompt i with label k.

        With single-token causal labels the prompts alone suffice: one forward pass gives the
        next-token distribution that scores every label at once.
        """
        if self.single_token_labels:
            batch = self.collate([(p, []) for p in prompts])
            last = torch.tensor([[len(p) - 1] for p in prompts], dtype=torch.long)  # (B, 1)
            return Batch(
                batch.input_ids,
                batch.attention_mask,
                last,
                torch.zeros_like(last),
                batch.real_tokens,
            )
        return self.collate([(p, ids) for p in prompts for ids in self.label_ids])


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, group: bool = True
) -> list[list[int]]:
    """Shuffle indices into batches; with `group`, batches hold sentences of similar length.

    Grouping sorts within shuffled windows of 50 batches (as HF's LengthGroupedSampler) and
    then shuffles the batch order, so padding is small while each epoch still differs.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group:
        window = batch_size * 50
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = [i for c in chunks for i in sorted(c, key=lambda j: -lengths[j])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group:
        rng.shuffle(batches)
    return batches


def sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Batches of indices for inference, longest first so padding stays minimal."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


# A forward pass's fixed cost in padded tokens (every weight matrix streamed from memory, a few
# hundred operator calls): a batch is cut only where that saves more padding than this. With 64,
# scoring 32-64 FPB sentences ran 1.5x faster on fp32 and bf16 CPUs (docs/benchmarks.md).
PASS_COST_TOKENS = 64


def padding_chunks(
    lengths: Sequence[int], max_rows: int, pass_cost: int = PASS_COST_TOKENS
) -> list[list[int]]:
    """Indices longest first, cut into runs of at most `max_rows` that minimise padded tokens
    plus `pass_cost` a run.

    Sorting alone leaves a run as wide as its longest row: for a few dozen sentences of mixed
    length, scored as one batch, a third of the tokens computed can be padding. The cut points
    are the exact optimum (dynamic programming over the sorted lengths).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: least cost of order[:j]
    cut = [0] * (n + 1)  # order[cut[j]:j] is the last run of that optimum
    for j in range(1, n + 1):
        for i in range(j - 1, max(j - max_rows, 0) - 1, -1):
            # order[i] is the run's longest row, so the run is as wide as it
            cost = best[i] + (j - i) * lengths[order[i]] + pass_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


def inference_batches(lengths: Sequence[int], batch_size: int, trim: bool) -> list[list[int]]:
    """Scoring batches of at most `batch_size` rows: cut to trim padding (`speed.trim_padding`)
    or simply `batch_size` rows at a time, longest first."""
    if trim:
        return padding_chunks(lengths, max_rows=batch_size)
    return list(sorted_batches(lengths, batch_size))


def token_budget_chunks(lengths: Sequence[int], budget: int | None) -> list[list[int]]:
    """Split one batch (indices into `lengths`) into micro-batches of at most `budget` padded
    tokens, longest rows first; a row longer than the budget goes alone. None: one chunk.

    Activation memory grows with padded tokens (~1.5 MB a token for a 135M model in fp32), so
    capping them bounds peak memory on the rare long batches without touching the common ones.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if budget is None:
        return [order] if order else []
    chunks: list[list[int]] = []
    for i in order:
        # Sorted longest first, so a chunk's padded width is the length of its first row.
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks
