"""Label-token logits, the training loss and label scores, for causal, seq2seq and encoder
classifier models; and the answer-token loss of instruction features.

The fast causal path runs the decoder stack once and applies the output head only at the label
positions: the full (B, T, V) logits tensor of a 49k-token vocabulary costs more memory and
time than the LoRA update itself. The plain path computes all logits and gathers; both give the
same numbers, which the tests check. Labels of several tokens are scored with one pass over
each prompt: every label continues from the prompt's cached keys and values (causal) or reads
the prompt's encoder states (seq2seq).

Prompt-learning methods (prefix, prompt, p-tuning) live in the PEFT wrapper's forward, which
adds the virtual tokens; calling the decoder stack underneath would silently drop them, so those
models always take the wrapper's forward.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from finlora.tasks.classify import (
    IGNORE,
    Batch,
    LabelCodec,
    inference_batches,
    pad_rows,
    sorted_batches,
)


def unwrap(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _gather_positions(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    index = positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, tensor.size(-1))  # (B, L, D)
    return tensor.gather(1, index)


def _attention(batch: Batch) -> dict[str, Any]:
    """A causal model's attention arguments: the padding mask; for packed rows no mask but
    position ids restarting at each record, from which transformers builds a causal mask that
    keeps the records apart. It does so only without a key/value cache: no cache is built."""
    if batch.position_ids is None:
        return {"attention_mask": batch.attention_mask}
    return {"attention_mask": None, "position_ids": batch.position_ids, "use_cache": False}


def _causal_fast(model: Any, batch: Batch, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at the label positions; with `vocab`, only those token ids' logits (B, L, len)."""
    base = unwrap(model)
    # No key/value cache: nothing continues from this pass (the model's default would build one).
    hidden = base.get_decoder()(
        input_ids=batch.input_ids, **{"use_cache": False, **_attention(batch)}
    ).last_hidden_state  # (B, T, H)
    picked = _gather_positions(hidden, batch.positions)
    head = base.get_output_embeddings()
    if vocab is None:
        return head(picked)  # (B, L, V)
    bias = None if head.bias is None else head.bias[vocab]
    return F.linear(picked, head.weight[vocab], bias)  # (B, L, len(vocab))


def _causal_plain(model: Any, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, **_attention(batch)).logits
    # Prompt and p-tuning prepend their virtual tokens to the sequence, so the logits have that
    # many extra leading positions; prefix tuning passes them as past key values and adds none.
    offset = logits.size(1) - batch.input_ids.size(1)
    return _gather_positions(logits, batch.positions + offset)  # (B, L, V)


def _seq2seq(model: Any, batch: Batch) -> torch.Tensor:
    # The decoder sees only the label tokens, so its logits are already "label positions only".
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.targets
    )
    return out.logits  # (B, L, V)


def _encoder(model: Any, batch: Batch) -> torch.Tensor:
    # The classification head's K logits act as one "label position" over a K-word vocabulary.
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits.unsqueeze(1)  # (B, 1, K)


def is_prompt_learning(model: Any) -> bool:
    """True for a PEFT model whose method adds virtual tokens (prefix, prompt, p-tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


LogitsFn = Callable[[Any, Batch], torch.Tensor]
LOGITS: dict[tuple[str, bool], LogitsFn] = {
    ("causal", True): _causal_fast,
    ("causal", False): _causal_plain,
    ("seq2seq", True): _seq2seq,
    ("seq2seq", False): _seq2seq,
    ("encoder", True): _encoder,
    ("encoder", False): _encoder,
}


def label_logits(model: Any, batch: Batch, kind: str, fast: bool = True) -> torch.Tensor:
    """Logits at the positions that predict label tokens. (B, L, V)"""
    fast = fast and not is_prompt_learning(model)
    return LOGITS[(kind, fast)](model, batch)


def loss_fn(model: Any, batch: Batch, kind: str, fast: bool = True) -> torch.Tensor:
    """Mean cross-entropy over the label tokens of the batch."""
    logits = label_logits(model, batch, kind, fast).float()  # (B, L, V)
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)


def sequence_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of each row's target tokens. (B,)"""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, L, V)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L)
    return (picked * (targets != IGNORE)).sum(-1)


def cache_argument(module: Any) -> str:
    """The name `module.forward` takes a key/value cache by: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _shared_prompt_loglik(
    model: Any, codec: LabelCodec, prompts: Sequence[list[int]], device: torch.device | None
) -> torch.Tensor:
    """Multi-token labels scored with one pass over each prompt: every label continues from
    the prompt's cached keys and values instead of re-reading the prompt once per label. (N, K)
    """
    base = unwrap(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    prompt = codec.collate([(p, []) for p in prompts])  # right-padded prompts
    if device is not None:
        prompt = prompt.to(device)
    n, k = len(prompts), len(codec.labels)
    lengths = prompt.attention_mask.sum(1)  # (N,)
    cache = DynamicCache(config=base.config)
    cache_arg = cache_argument(decoder)
    hidden = decoder(
        input_ids=prompt.input_ids,
        attention_mask=prompt.attention_mask,
        use_cache=True,
        **{cache_arg: cache},
    ).last_hidden_state  # (N, W, H)
    last = hidden[torch.arange(n, device=hidden.device), lengths - 1]  # (N, H)
    first = F.log_softmax(head(last).float(), dim=-1)  # (N, V): predicts each label's token 0
    first_ids = torch.tensor([ids[0] for ids in codec.label_ids], device=first.device)
    scores = first[:, first_ids]  # (N, K)

    # Row i*K + k feeds label k's tokens but its last to prompt i's cache; position j predicts
    # label token j + 1. Labels shorter than the longest are padded and masked.
    rest = [ids[1:] for ids in codec.label_ids]
    width = max(len(r) for r in rest)
    cache.batch_repeat_interleave(k)
    feed = pad_rows([ids[:-1] for ids in codec.label_ids], codec.pad_id).repeat(n, 1)
    targets = pad_rows(rest, IGNORE).repeat(n, 1).to(first.device)  # (N*K, width)
    real = pad_rows([[1] * len(r) for r in rest], 0).repeat(n, 1).to(first.device)
    mask = torch.cat([prompt.attention_mask.repeat_interleave(k, 0), real], dim=1)
    positions = lengths.repeat_interleave(k)[:, None] + torch.arange(width, device=first.device)
    hidden = decoder(
        input_ids=feed.to(first.device),
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{cache_arg: cache},
    ).last_hidden_state  # (N*K, width, H)
    return scores + sequence_logprob(head(hidden), targets).view(n, k)


def _shared_encoder_loglik(
    model: Any, codec: LabelCodec, prompts: Sequence[list[int]], device: torch.device | None
) -> torch.Tensor:
    """Seq2seq labels scored with one encoder pass per prompt: every label's decoder pass reads
    the same encoder states instead of re-encoding the prompt once per label. (N, K)"""
    base = unwrap(model)
    ids = pad_rows(prompts, codec.pad_id)  # (N, W)
    mask = pad_rows([[1] * len(p) for p in prompts], 0)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    n, k = len(prompts), len(codec.labels)
    encoded = base.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    # Row i*K + k: prompt i's encoder states with label k as the decoder target.
    targets = pad_rows(codec.label_ids, IGNORE).repeat(n, 1).to(encoded.device)  # (N*K, L)
    logits = base(
        encoder_outputs=(encoded.repeat_interleave(k, 0),),
        attention_mask=mask.repeat_interleave(k, 0),
        labels=targets,
    ).logits  # (N*K, L, V)
    return sequence_logprob(logits, targets).view(n, k)


def _within_window(model: Any, codec: LabelCodec, prompts: Sequence[list[int]]) -> bool:
    """Whether the longest prompt and label fit a sliding attention window, if the model has one.

    A sliding-window cache drops keys older than the window, and the labels' pass over the
    right-padded prompts' cache (shared-prompt scoring) then lines up with the wrong ones; past
    the window, labels are scored a row each (tested on a Mistral with a 4-token window).
    """
    window = getattr(unwrap(model).config, "sliding_window", None)
    longest = max(len(p) for p in prompts) + max(len(ids) for ids in codec.label_ids)
    return window is None or longest <= window


@torch.no_grad()
def label_loglik(
    model: Any,
    codec: LabelCodec,
    prompts: Sequence[list[int]],
    fast: bool = True,
    device: torch.device | None = None,
    shared_prompt: bool = True,
    normalized: bool = True,
) -> torch.Tensor:
    """Log-likelihood of every label's tokens after each prompt. (N, K)

    With `normalized=False` a row may be off by a constant of its own, which leaves its softmax
    over the labels unchanged: labels of one token then take the label tokens' logits alone,
    without the output head over the whole vocabulary for the log-softmax's denominator.
    """
    fast = fast and not is_prompt_learning(model)
    if fast and shared_prompt:
        causal_multi = codec.kind == "causal" and not codec.single_token_labels
        if causal_multi and _within_window(model, codec, prompts):
            return _shared_prompt_loglik(model, codec, prompts, device)
        if codec.kind == "seq2seq":
            return _shared_encoder_loglik(model, codec, prompts, device)
    batch = codec.scoring_batch(prompts)
    if device is not None:
        batch = batch.to(device)
    n, k = len(prompts), len(codec.labels)
    if codec.single_token_labels:
        # One position per prompt; its next-token distribution scores every label.
        ids = torch.tensor([ids[0] for ids in codec.label_ids], device=batch.input_ids.device)
        if fast and not normalized and codec.kind == "causal":
            return _causal_fast(model, batch, ids)[:, 0].float()  # (N, K)
        logits = label_logits(model, batch, codec.kind, fast)
        return F.log_softmax(logits[:, 0].float(), dim=-1)[:, ids]  # (N, K)
    logits = label_logits(model, batch, codec.kind, fast)
    return sequence_logprob(logits, batch.targets).view(n, k)


def predict_proba(
    model: Any,
    codec: LabelCodec,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    fast: bool = True,
    shared_prompt: bool = True,
    trim_padding: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Probabilities over `codec.labels` for each text. (N, K), rows sum to 1."""
    model.eval()
    prompts = [codec.encode_text(t) for t in texts]
    # Only the softmax over the labels is kept: a constant per row does not matter.
    loglik = prompt_logliks(
        model, codec, prompts, batch_size=batch_size, device=device, dtype=dtype, fast=fast,
        shared_prompt=shared_prompt, trim_padding=trim_padding, normalized=False,
        progress=progress,
    )  # fmt: skip
    return torch.softmax(loglik.float(), dim=-1).numpy().astype(np.float64)


def prompt_logliks(
    model: Any,
    codec: LabelCodec,
    prompts: Sequence[list[int]],
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    fast: bool = True,
    shared_prompt: bool = True,
    trim_padding: bool = True,
    normalized: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Every label's log-likelihood after each encoded prompt, (N, K) float64 on the CPU, in
    length-sorted batches: the scoring of prediction, evaluation and validation alike."""
    device = device or torch.device("cpu")
    out = torch.zeros(len(prompts), len(codec.labels), dtype=torch.float64)
    bar = tqdm(total=len(prompts), desc="scoring", unit="sent", disable=not progress, leave=False)
    with autocast(device, dtype):
        for idx in inference_batches([len(p) for p in prompts], batch_size, trim_padding):
            chunk = [prompts[i] for i in idx]
            loglik = label_loglik(model, codec, chunk, fast, device, shared_prompt, normalized)
            out[idx] = loglik.double().cpu()
            bar.update(len(idx))
    bar.close()
    return out


@torch.no_grad()
def response_nll(
    model: Any,
    codec: Any,
    features: Sequence[Any],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    fast: bool = True,
) -> tuple[float, int]:
    """Summed cross-entropy over the target (answer) tokens of instruction features, and how
    many there are: exp(sum / count) is the held-out perplexity."""
    total, count = 0.0, 0
    for idx in sorted_batches([codec.width(f) for f in features], batch_size):
        chunk = [features[i] for i in idx]
        batch = codec.training_batch(chunk).to(device)
        n = sum(codec.target_count(f) for f in chunk)
        with autocast(device, dtype):
            total += float(loss_fn(model, batch, codec.kind, fast)) * n
        count += n
    return total, count
