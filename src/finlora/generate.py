"""Text generation for instruction runs: batched answers for evaluation, streamed ones for people.

Greedy decoding is the default, so an answer is reproducible; sampling (temperature, top-p,
top-k) is an option. Generation stops at the tokenizer's end-of-sequence token and at the model's
own end-of-turn tokens (its generation config), whichever comes first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TextStreamer

from finlora.errors import FinloraError
from finlora.scoring import autocast
from finlora.tasks.classify import sorted_batches


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise FinloraError(f"--max-new-tokens must be positive (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise FinloraError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise FinloraError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise FinloraError(f"--top-k must be >= 0 (got {self.top_k})")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
        }


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the tokenizer's and those of the model's generation config."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def _generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    options: GenerationOptions,
    device: torch.device,
    streamer: Any = None,
) -> torch.Tensor:
    """New tokens for left-padded prompts. (B, new)"""
    pad = int(tokenizer.pad_token_id)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=options.max_new_tokens,
        eos_token_id=stop_ids(model, tokenizer),
        pad_token_id=pad,
        streamer=streamer,
        **options.generate_kwargs(),
    )
    return out[:, width:]


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    options: GenerationOptions,
    *,
    batch_size: int = 16,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[str]:
    """The decoded answer to each prompt, in order; batches hold prompts of similar length."""
    device = device or torch.device("cpu")
    model.eval()
    answers = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generating", unit="answer", disable=not progress)
    with autocast(device, dtype):
        for idx in sorted_batches([len(p) for p in prompts], batch_size):
            new = _generate(model, tokenizer, [prompts[i] for i in idx], options, device)
            for i, row in zip(idx, new.tolist(), strict=True):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            bar.update(len(idx))
    bar.close()
    return answers


class _CallbackStreamer(TextStreamer):
    """transformers' streamer (it decodes whole words, never half a character), with the text
    handed to a callback instead of print, and the new token ids counted."""

    def __init__(self, tokenizer: Any, write: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._write = write
        self.pieces: list[str] = []
        self.new_ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.new_ids.extend(int(i) for i in value.reshape(-1).tolist())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.pieces.append(text)
            self._write(text)


@dataclass(frozen=True)
class Reply:
    text: str
    new_tokens: int  # generated tokens, the stop token included
    hit_limit: bool  # cut at max_new_tokens rather than ended by a stop token


@torch.no_grad()
def stream_reply(
    model: Any,
    tokenizer: Any,
    prompt: list[int],
    options: GenerationOptions,
    write: Callable[[str], None],
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Reply:
    """Generate one answer, handing text to `write` as tokens arrive."""
    device = device or torch.device("cpu")
    model.eval()
    streamer = _CallbackStreamer(tokenizer, write)
    with autocast(device, dtype):
        _generate(model, tokenizer, [prompt], options, device, streamer)
    ids = streamer.new_ids
    stopped = bool(ids) and ids[-1] in stop_ids(model, tokenizer)
    return Reply("".join(streamer.pieces).strip(), len(ids), not stopped)
