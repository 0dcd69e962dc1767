"""Preference tuning: a prompt and its answers (chosen and rejected, or one judged completion) as
token rows whose targets are the answer tokens only.

The prompt is rendered exactly as an instruct run renders it (the same `InstructCodec`: the
model's chat template, or an Alpaca template), so the tuned adapter answers through generate,
chat, serve and export as an instruct run's does. Each answer follows that prompt as training
writes an answer: through the chat template's end of turn, or with the end-of-sequence token
after an Alpaca response. Every answer of a record shares one prompt, cut to the same tokens
where `max_length` needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finlora.config import DataConfig
from finlora.data.preference import PreferenceRecord
from finlora.errors import FinloraError
from finlora.prompts import InstructTemplate
from finlora.tasks.classify import IGNORE, Batch, pad_rows
from finlora.tasks.instruct import InstructCodec


@dataclass(frozen=True)
class PreferenceFeature:
    """One record as tokens: its prompt, and each answer with whether it is the better one."""

    prompt: tuple[int, ...]
    answers: tuple[tuple[int, ...], ...]  # a pair: (chosen, rejected); unpaired: (completion,)
    desirable: tuple[bool, ...]  # a pair: (True, False)
    # Set once before training (`finlora.training.preference`): each answer's log-probability
    # under the reference model, summed over its tokens.
    reference: tuple[float, ...] | None = None
    # KTO: another record's answer after this prompt, and its reference log-probability, for
    # the estimate of the KL divergence between policy and reference.
    mismatched: tuple[int, ...] = ()
    mismatched_reference: float | None = None

    @property
    def paired(self) -> bool:
        return self.desirable == (True, False)

    def rows(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(prompt, answer) of each answer, in order."""
        return [(self.prompt, answer) for answer in self.answers]


class PreferenceCodec:
    """Turns preference records into features, and features into padded rows of answers."""

    kind = "causal"
    prompt_only = False

    def __init__(self, prompts: InstructCodec) -> None:
        if prompts.kind != "causal":
            raise FinloraError(
                f"task preference needs a causal language model, not a {prompts.kind} model"
            )
        self.prompts = prompts  # renders prompts as instruct runs and generation do
        self.tokenizer = prompts.tokenizer
        self.max_length = prompts.max_length
        self.overflow = prompts.overflow
        self.pad_id = prompts.pad_id

    @classmethod
    def for_data(cls, tokenizer: Any, data: DataConfig, kind: str = "causal") -> PreferenceCodec:
        template = InstructTemplate.load(data.template)
        return cls(InstructCodec(tokenizer, template, data.max_length, kind))

    def _tokens(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _answer(self, record: PreferenceRecord, prompt_text: str, answer: str) -> list[int]:
        """The tokens of `answer` after the prompt, as instruct training writes an answer."""
        if not self.prompts.template.is_chat:
            return self._tokens(answer, special=False) + self.prompts.eos_ids
        rows = [{"role": m.role, "content": m.content} for m in record.prompt_messages]
        rows.append({"role": "assistant", "content": answer})
        whole = str(self.tokenizer.apply_chat_template(rows, tokenize=False))
        if not whole.startswith(prompt_text):
            raise FinloraError(
                "data.template: chat: this model's chat template does not render a "
                "conversation as a prefix of its continuation (use data.template: alpaca)"
            )
        return self._tokens(whole[len(prompt_text) :], special=False)

    def encode(self, record: PreferenceRecord) -> PreferenceFeature | None:
        """Prompt and answer tokens; None when `max_length` leaves an answer no token.

        Too long a record keeps its answers whole where it can: the prompt is cut first (an
        Alpaca prompt loses the end of its longest field, a chat prompt its start), down to
        half of `max_length`; then the answers lose their ends."""
        text = self.prompts.prompt_text(record)
        # A chat template writes its own BOS where the model wants one; Alpaca text gets the
        # tokenizer's special tokens, as instruct training and generation do.
        prompt = self._tokens(text, special=not self.prompts.template.is_chat)
        answers = [self._answer(record, text, answer) for answer, _ in record.answers]
        longest = max(len(a) for a in answers)
        if len(prompt) + longest > self.max_length:
            budget = max(self.max_length - longest, self.max_length // 2)
            if len(prompt) > budget:
                prompt = self.prompts.generation_prompt(record, budget)  # cut and counted
            else:
                self.overflow.add(len(prompt) + longest)
            answers = [a[: self.max_length - len(prompt)] for a in answers]
        if not (prompt and all(answers)):
            return None
        return PreferenceFeature(
            tuple(prompt),
            tuple(tuple(a) for a in answers),
            tuple(desirable for _, desirable in record.answers),
        )

    def mismatched(self, feature: PreferenceFeature, other: PreferenceFeature) -> tuple[int, ...]:
        """`other`'s first answer after `feature`'s prompt, cut to `max_length` (KTO's KL
        estimate reads answers after prompts they do not answer)."""
        room = self.max_length - len(feature.prompt)
        return other.answers[0][: max(room, 1)]

    # ---- batches --------------------------------------------------------------------------

    def width(self, feature: PreferenceFeature) -> int:
        """The padded tokens the feature's rows take in a batch of their own."""
        return len(feature.answers) * max(len(feature.prompt) + len(a) for a in feature.answers)

    def target_count(self, feature: PreferenceFeature) -> int:
        return sum(len(a) for a in feature.answers)

    def training_batch(self, features: Sequence[PreferenceFeature]) -> Batch:
        """Every answer of every feature as one right-padded row, in order (a pair: its chosen
        row, then its rejected row); an answer token i is predicted at position i - 1."""
        return self.rows_batch([row for f in features for row in f.rows()])

    def rows_batch(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Batch:
        """(prompt, answer) rows as a batch whose targets are the answer tokens."""
        ids = [list(prompt) + list(answer) for prompt, answer in rows]
        positions = [
            list(range(len(prompt) - 1, len(prompt) + len(answer) - 1)) for prompt, answer in rows
        ]
        return Batch(
            pad_rows(ids, self.pad_id),
            pad_rows([[1] * len(r) for r in ids], 0),
            pad_rows(positions, -1),
            pad_rows([list(answer) for _, answer in rows], IGNORE),
            sum(len(r) for r in ids),
        )

    @staticmethod
    def desirable(features: Sequence[PreferenceFeature]) -> torch.Tensor:
        """Whether each row of `training_batch(features)` is a better answer. (R,) bool"""
        return torch.tensor([d for f in features for d in f.desirable], dtype=torch.bool)
