"""Instruction tuning as the Alpaca-LoRA recipe does it: prompt + response, loss on the response.

A record becomes one token sequence of alternating segments: prompt segments (the template's
text, the user's turns) and response segments (the assistant's answers, with the end-of-turn
token so the model learns to stop). Only response tokens are targets; prompt tokens are masked.

A seq2seq model (T5, mT0, BART) reads the prompt with its encoder and is trained to write the
response with its decoder: the same records, with prompt and response in separate rows.

Two kinds of template:
- "chat": the model's own chat template (tokenizer.apply_chat_template); every assistant turn of
  a multi-turn conversation is a target;
- an Alpaca-style JSON template (`templates/alpaca.json`, or a file) with `prompt_input` and
  `prompt_no_input`, holding `{instruction}` and `{input}`; the response follows the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from finlora.config import DataConfig
from finlora.data.instruct import InstructRecord, Message
from finlora.errors import FinloraError
from finlora.prompts import InstructTemplate
from finlora.tasks.classify import IGNORE, Batch, Overflow, pad_rows


@dataclass(frozen=True)
class InstructFeature:
    # Causal: one sequence. Seq2seq: the encoder's prompt, then the decoder's response.
    ids: list[int]
    targets: tuple[int, ...]  # indices into `ids` of the response tokens (the trained ones)
    # Where each record starts in `ids`: several in a packed sequence (train.packing), whose
    # records each attend only to themselves.
    starts: tuple[int, ...] = (0,)

    @property
    def position_ids(self) -> list[int]:
        """Each token's position within its own record."""
        ends = (*self.starts[1:], len(self.ids))
        return [p for start, end in zip(self.starts, ends, strict=True) for p in range(end - start)]


class InstructCodec:
    """Turns instruction records into token features, and features into padded batches."""

    def __init__(
        self,
        tokenizer: Any,
        template: InstructTemplate,
        max_length: int = 512,
        kind: str = "causal",
    ) -> None:
        if kind not in ("causal", "seq2seq"):
            raise FinloraError(
                f"task instruct needs a causal or seq2seq language model, not an {kind} model "
                "(use task: classify)"
            )
        self.kind = kind
        if template.is_chat and not getattr(tokenizer, "chat_template", None):
            raise FinloraError(
                "data.template: chat needs a model with a chat template, and this tokenizer has "
                "none (use data.template: alpaca)"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.pad_id = int(tokenizer.pad_token_id)
        self.overflow = Overflow()
        eos = tokenizer.eos_token_id
        self.eos_ids = [int(eos)] if eos is not None else []

    @classmethod
    def for_data(cls, tokenizer: Any, data: DataConfig, kind: str = "causal") -> InstructCodec:
        return cls(tokenizer, InstructTemplate.load(data.template), data.max_length, kind)

    @property
    def prompt_only(self) -> bool:
        """The model reads the prompt alone; the response is the decoder's (seq2seq)."""
        return self.kind == "seq2seq"

    def _tokens(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        rows = [{"role": m.role, "content": m.content} for m in messages]
        return str(
            self.tokenizer.apply_chat_template(
                rows, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def _alpaca_prompt(self, record: InstructRecord) -> str:
        instruction, input_text = record.instruction, record.input
        if instruction is None:
            turns = [m for m in record.messages if m.role != "system"]
            if len(turns) != 2:
                raise FinloraError(
                    f"{record.source}: a multi-turn chat needs data.template: chat "
                    f"(the {self.template.name} template holds one instruction and one answer)"
                )
            instruction = turns[0].content
        return self.template.prompt(instruction, input_text)

    def _segments(self, record: InstructRecord) -> list[tuple[str, bool]]:
        """(text, is_response) pieces whose concatenation is the whole rendered record."""
        if not self.template.is_chat:
            return [(self._alpaca_prompt(record), False), (record.response, True)]
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(record.messages):
            if message.role != "assistant":
                continue
            before = self._render(record.messages[:i], generation_prompt=True)
            after = self._render(record.messages[: i + 1], generation_prompt=False)
            if not (before.startswith(done) and after.startswith(before)):
                raise FinloraError(
                    "data.template: chat: this model's chat template does not render a "
                    "conversation as a prefix of its continuation (use data.template: alpaca)"
                )
            segments += [(before[len(done) :], False), (after[len(before) :], True)]
            done = after
        return segments

    def encode(self, record: InstructRecord) -> InstructFeature | None:
        """Token ids and target positions; None when `max_length` leaves no response token."""
        if self.prompt_only:
            answer = list(self.tokenizer(text_target=record.response)["input_ids"])
            if answer[-1:] != self.eos_ids:  # T5's tokenizer ends targets with </s>; others not
                answer += self.eos_ids
            whole = self._prompt_tokens(record)
            if len(whole) > self.max_length or len(answer) > self.max_length:
                self.overflow.add(max(len(whole), len(answer)))
            prompt = whole if len(whole) <= self.max_length else self._fitted(
                record, whole, self.max_length
            )  # fmt: skip
            answer = answer[: self.max_length]
            start = len(prompt)
            kept = tuple(range(start, start + len(answer)))
            return InstructFeature(prompt + answer, kept) if kept else None
        ids: list[int] = []
        targets: list[int] = []
        # A chat template writes its own BOS (as `{{ bos_token }}`) where the model wants one, so
        # its text is tokenized without special tokens, as generation_prompt and transformers'
        # apply_chat_template do; adding them here would train on a doubled BOS.
        special = not self.template.is_chat
        for n, (text, is_response) in enumerate(self._segments(record)):
            piece = self._tokens(text, special=special and n == 0)
            if is_response and not self.template.is_chat:
                piece += self.eos_ids  # the chat template already ends the turn itself
            if is_response:
                targets += range(len(ids), len(ids) + len(piece))
            ids += piece
        if len(ids) > self.max_length:
            self.overflow.add(len(ids))
            if not self.template.is_chat and targets:
                # Keep the answer and the template around a shorter input, as generation reads
                # it; the answer keeps at least half of max_length.
                start = targets[0]
                room = max(self.max_length - (len(ids) - start), self.max_length // 2)
                fitted = self._fitted_alpaca(record, ids[:start], room) if start > room else None
                prompt = ids[:start] if fitted is None else fitted  # no fit: the answer is cut
                ids = prompt + ids[start:]
                targets = list(range(len(prompt), len(ids)))
        ids = ids[: self.max_length]
        kept = tuple(t for t in targets if 0 < t < len(ids))
        return InstructFeature(ids, kept) if kept else None

    def prompt_text(self, record: InstructRecord) -> str:
        """The text a model continues to answer `record` (its last answer left out)."""
        if not self.template.is_chat:
            return self._alpaca_prompt(record)
        return self._render(record.prompt_messages, generation_prompt=True)

    def generation_prompt(self, record: InstructRecord, budget: int | None = None) -> list[int]:
        """The tokens of `prompt_text`, no longer than `max_length` (what training read) or a
        smaller `budget` (room left for the answer), counted in `overflow` when cut."""
        limit = self.max_length if budget is None else min(budget, self.max_length)
        tokens = self._prompt_tokens(record)
        if len(tokens) <= limit:
            return tokens
        self.overflow.add(len(tokens))
        return self._fitted(record, tokens, limit)

    def _fitted(self, record: InstructRecord, tokens: list[int], limit: int) -> list[int]:
        """A prompt too long for `limit` tokens, cut to fit. An Alpaca prompt loses the end of
        its longer field (input or instruction), then of the other, so the template's header
        and "### Response:" stay; a chat prompt (or an Alpaca header longer than `limit` alone)
        loses its start."""
        if not self.template.is_chat:
            fitted = self._fitted_alpaca(record, tokens, limit)
            if fitted is not None:
                return fitted
        return tokens[-limit:]

    def _fitted_alpaca(
        self, record: InstructRecord, tokens: list[int], limit: int
    ) -> list[int] | None:
        """The Alpaca prompt with the end of its longer field (input or instruction), then of
        the other, cut until it fits; None when even empty fields would not. Token boundaries
        move when text is cut, so each try cuts a few tokens more than the last fell short."""
        if record.instruction is None:
            return None  # a chat record under the Alpaca template: its turns are not fields
        fields = {f: self._tokens(getattr(record, f) or "") for f in ("input", "instruction")}
        for field, pieces in sorted(fields.items(), key=lambda item: -len(item[1])):
            excess = len(tokens) - limit
            for _ in range(4):
                if len(tokens) <= limit or not pieces:
                    break
                keep = max(len(pieces) - excess, 0)
                shorter = self.tokenizer.decode(pieces[:keep], skip_special_tokens=True).rstrip()
                record = replace(record, **{field: shorter})
                tokens = self._prompt_tokens(record)
                if keep == 0:
                    break  # the field is empty: the next one is cut
                excess += max(len(tokens) - limit, 0) + 2
            if len(tokens) <= limit:
                return tokens
        return None

    def _prompt_tokens(self, record: InstructRecord) -> list[int]:
        # Alpaca text gets the tokenizer's special tokens (BOS; a T5 encoder's closing </s>);
        # a chat template writes its own.
        return self._tokens(self.prompt_text(record), special=not self.template.is_chat)

    def chat_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The tokens for a conversation so far, ending where the assistant speaks next."""
        if self.template.is_chat:
            return self._tokens(self._render(messages, generation_prompt=True))
        # The Alpaca template has no turns: the latest user message is the instruction.
        text = self.template.prompt(messages[-1].content, "")
        return self._tokens(text, special=True)

    # ---- batches --------------------------------------------------------------------------

    def width(self, feature: InstructFeature) -> int:
        return len(feature.ids)

    def target_count(self, feature: InstructFeature) -> int:
        return len(feature.targets)

    def training_batch(self, features: Sequence[InstructFeature]) -> Batch:
        """Right-padded rows; a target token i is predicted at position i - 1. Seq2seq: the
        prompts are the rows and the responses the decoder's targets."""
        if self.prompt_only:
            prompts = [f.ids[: f.targets[0]] for f in features]
            targets = pad_rows([f.ids[f.targets[0] :] for f in features], IGNORE)
            return Batch(
                pad_rows(prompts, self.pad_id),
                pad_rows([[1] * len(p) for p in prompts], 0),
                torch.zeros_like(targets),
                targets,
                sum(len(f.ids) for f in features),
            )
        rows = [f.ids for f in features]
        return Batch(
            pad_rows(rows, self.pad_id),
            pad_rows([[1] * len(r) for r in rows], 0),
            pad_rows([[t - 1 for t in f.targets] for f in features], -1),
            pad_rows([[f.ids[t] for t in f.targets] for f in features], IGNORE),
            sum(len(r) for r in rows),
            _packed_positions(features),
        )


def _packed_positions(features: Sequence[InstructFeature]) -> torch.Tensor | None:
    """Position ids of right-padded rows when any row is packed, else None (B, T). A row's
    padding restarts at 0 too: a run of its own, which no record attends to."""
    if all(len(f.starts) == 1 for f in features):
        return None
    width = max(len(f.ids) for f in features)
    return torch.tensor([f.position_ids + list(range(width - len(f.ids))) for f in features])
