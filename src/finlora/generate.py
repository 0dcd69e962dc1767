"""Text generation for instruction runs: batched answers for evaluation, streamed ones for people.

Greedy decoding is the default, so an answer is reproducible; sampling (temperature, top-p,
top-k) is an option. Generation stops at the tokenizer's end-of-sequence token and at the model's
own end-of-turn tokens (its generation config), whichever comes first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftType
from tqdm.auto import tqdm
from transformers import TextStreamer

from finlora.errors import FinloraError
from finlora.scoring import autocast, cache_argument, is_prompt_learning, unwrap
from finlora.tasks.classify import sorted_batches

# PEFT puts virtual tokens in front of both the encoder's and the decoder's input of a seq2seq
# model; generating after the decoder's is not built (`finlora train` refuses such runs first).
SEQ2SEQ_VIRTUAL_TOKENS = (
    "methods prefix, prompt and ptuning cannot be used for instruction tuning of a seq2seq "
    "model (generation after their virtual tokens is built for causal models only); use lora, "
    "ia3, freeze or full"
)


# A temperature this low samples the argmax anyway, and dividing the logits by it overflows
# them to inf (NaN probabilities): such temperatures decode greedily.
GREEDY_BELOW = 1e-5


# The longest answer one may ask for. A decoder-only model stops at its last position anyway,
# but an encoder-decoder has no such limit: a model that never writes its end token would run on
# for as many tokens as asked (hours on a CPU).
MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 (below GREEDY_BELOW): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.max_new_tokens <= MAX_NEW_TOKENS:
            raise FinloraError(
                f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS} "
                f"(got {self.max_new_tokens})"
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise FinloraError(f"--temperature must be a number >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:  # false for NaN too
            raise FinloraError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise FinloraError(f"--top-k must be >= 0 (got {self.top_k})")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature < GREEDY_BELOW:
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
    """New tokens for the prompts, left-padded (a seq2seq encoder's: right-padded). (B, new)"""
    pad = int(tokenizer.pad_token_id)
    width = max(len(p) for p in prompts)
    seq2seq = bool(getattr(unwrap(model).config, "is_encoder_decoder", False))
    rows, masks = [], []
    for p in prompts:
        padding = width - len(p)
        # A decoder continues each row from its last token, so rows must end together; an
        # encoder reads its rows whole, padded on the right as in training.
        if seq2seq:
            rows.append([*p, *[pad] * padding])
            masks.append([1] * len(p) + [0] * padding)
        else:
            rows.append([*[pad] * padding, *p])
            masks.append([0] * padding + [1] * len(p))
    ids = torch.tensor(rows, device=device)
    mask = torch.tensor(masks, device=device)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    kwargs = {
        "max_new_tokens": _room(model, width, options.max_new_tokens),
        "eos_token_id": stop_ids(model, tokenizer),
        "pad_token_id": pad,
        "streamer": streamer,
        **options.generate_kwargs(),
    }
    if is_prompt_learning(model):
        if seq2seq:
            raise FinloraError(SEQ2SEQ_VIRTUAL_TOKENS)
        return _generate_after_virtual_tokens(model, ids, mask, pad, kwargs)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    # A decoder-only model returns prompt + answer; an encoder-decoder its decoder's start
    # token + answer.
    return out[:, 1:] if seq2seq else out[:, width:]


def position_limit(model: Any) -> int | None:
    """Positions a decoder-only model has for prompt and answer together, after any virtual
    tokens; None where there is no fixed limit (an encoder-decoder's relative positions)."""
    config = unwrap(model).config
    limit = getattr(config, "max_position_embeddings", None)
    if getattr(config, "is_encoder_decoder", False) or not isinstance(limit, int):
        return None
    virtual = model.active_peft_config.num_virtual_tokens if is_prompt_learning(model) else 0
    return int(limit - virtual)


def _room(model: Any, width: int, wanted: int) -> int:
    """New tokens that fit after a prompt of `width` tokens: `wanted` or fewer. Past the last
    position a model with learned positions (GPT-2) fails on an index, and a rotary one runs
    where it never trained."""
    limit = position_limit(model)
    if limit is None:
        return wanted
    if width >= limit:
        raise FinloraError(
            f"the prompt takes {width} of the {limit} positions the model has for prompt and "
            "answer, leaving none to answer in; shorten it"
        )
    return min(wanted, limit - width)


def _generate_after_virtual_tokens(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pad: int, kwargs: dict[str, Any]
) -> torch.Tensor:
    """New tokens of a prefix, prompt or P-tuning model, generated by its base model with the
    virtual tokens put in front as training put them. (B, new)

    Not PEFT's own generate: PEFT 0.21 looks for the cache under `past_key_values`, which
    transformers 5.2x passes as `cache`, so it re-inserts the virtual tokens at every step:
    wrong tokens, and a cache that grows by the prompt at each one (a compare's prompt-tuning
    eval ran over 15 minutes where LoRA's took 73 s).
    """
    config = model.active_peft_config
    n = config.num_virtual_tokens
    base = model.get_base_model()
    batch = ids.shape[0]
    mask = torch.cat([mask.new_ones(batch, n), mask], 1)  # (B, n + T)
    if config.peft_type == PeftType.PREFIX_TUNING:
        # The virtual tokens are keys and values, handed over as the cache; placeholder ids
        # stand in their positions, and generate reads only what follows the cache.
        placeholders = ids.new_full((batch, n), pad)
        cache = {cache_argument(base): model.get_prompt(batch)}
        out = base.generate(
            input_ids=torch.cat([placeholders, ids], 1), attention_mask=mask, **cache, **kwargs
        )
        return out[:, n + ids.shape[1] :]
    embeddings = base.get_input_embeddings()
    prompts = model.get_prompt(batch).to(embeddings.weight.dtype)  # (B, n, D)
    embeds = torch.cat([prompts, embeddings(ids)], 1)  # (B, n + T, D)
    # Given embeddings alone, generate returns the new tokens only.
    return base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


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
