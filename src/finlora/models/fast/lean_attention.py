"""Llama-family attention for inference in fewer passes over memory (`speed.lean_attention`).

transformers' eager attention under bf16 autocast promotes q and k to fp32 in the rotary
embedding (its cos and sin are fp32), copies k and v once per query head (`repeat_kv`), adds
the mask in fp32 and runs the softmax there, and autocast casts q, k and the weights back to
bf16 for the matmuls: on 2 cores of an AMX CPU, ~19% of a scoring pass went to this work
outside the matmuls (profiled on 2 CPU cores). This forward computes the same numbers with fewer
passes:
- the rotary embedding in fp32 as transformers does (x·cos + rotate_half(x)·sin), written once
  in the matmul's dtype, already laid out by key/value head: four passes instead of six and
  the two casts;
- the query heads that share a key/value head multiply it as one matrix, so k and v are never
  copied per head;
- the scaled scores take the mask and the softmax in place, in the matmul's dtype (the softmax
  computes in fp32 inside and rounds once, as the cast after transformers' fp32 softmax does).

Only without gradients, without a key/value cache and with eager attention; anything else (and
any model outside LEAN_ATTENTION) takes transformers' own forward. Tests check the scores against
it in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch

# Attention modules whose forward is exactly: q, k, v projections, rotary embedding from
# `position_embeddings`, eager attention with an additive mask, o projection.
LEAN_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention")

T = TypeVar("T")


class PerPass:
    """What every layer of one forward pass derives alike from the tensors it is handed (the
    sign-folded sine, the mask in the compute dtype): derived by the first layer, reused by the
    rest while the same tensor comes back."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[torch.Tensor, Any]] = {}

    def derive(self, name: str, source: torch.Tensor, fn: Callable[[torch.Tensor], T]) -> T:
        held = self._held.get(name)
        if held is None or held[0] is not source:
            held = (source, fn(source))
            self._held[name] = held
        return held[1]


def sign_folded(sin: torch.Tensor) -> torch.Tensor:
    """(-sin₁, sin₂): rotate_half(x)·sin equals (x₂, x₁)·this, with x's halves swapped."""
    half = sin.size(-1) // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def mask_in(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    # fp32's lowest value rounds to -inf in bf16, and a row masked throughout (a padding query)
    # would then give NaN instead of transformers' uniform weights: clamp to dtype's lowest.
    return lambda mask: mask.clamp(min=torch.finfo(dtype).min).to(dtype)


def rotated(
    x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, computed in fp32 when cos is fp32, written contiguous in
    `dtype`. x: (B, Hkv, G, T, D), a view; cos, sin_folded: broadcastable (B, 1, 1, T, D)."""
    half = x.size(-1) // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # (x₂, x₁)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    # Two products and a sum, as transformers rounds them (addcmul fuses and rounds once).
    return torch.add(x * cos, swapped * sin_folded, out=out)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def eager_call_without_cache(
    config: Any, position_embeddings: Any, attention_mask: Any, kwargs: dict
) -> bool:
    """An eager-attention call, not compiled, with rotary embeddings, an additive float mask and
    no key/value cache: what the lean and the fused (training) forwards compute themselves."""
    return not (
        torch.compiler.is_compiling()
        or config._attn_implementation != "eager"
        or position_embeddings is None
        or attention_mask is None
        or not attention_mask.is_floating_point()
        or kwargs.get("cache") is not None
        or kwargs.get("past_key_values") is not None
    )


def _takes_lean_path(
    self: Any, position_embeddings: Any, attention_mask: Any, args: tuple, kwargs: dict
) -> bool:
    scoring = not (args or torch.is_grad_enabled() or self.training)
    plain = eager_call_without_cache(self.config, position_embeddings, attention_mask, kwargs)
    return scoring and plain and not kwargs.get("output_attentions")


def _lean_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if not _takes_lean_path(self, position_embeddings, attention_mask, args, kwargs):
        return self._finlora_plain_forward(
            hidden_states, position_embeddings, attention_mask, *args, **kwargs
        )
    assert position_embeddings is not None and attention_mask is not None
    b, t, _ = hidden_states.shape
    d, g = self.head_dim, self.num_key_value_groups
    per_pass: PerPass = self._finlora_per_pass
    # Query head h uses key/value head h // g (transformers' repeat_kv): group them by it.
    q = self.q_proj(hidden_states).view(b, t, -1, g, d).permute(0, 2, 3, 1, 4)  # (B,Hkv,G,T,D)
    k = self.k_proj(hidden_states).view(b, t, -1, 1, d).permute(0, 2, 3, 1, 4)  # (B,Hkv,1,T,D)
    v = self.v_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)  # (B,Hkv,T,D)
    hkv = k.size(1)
    dtype = compute_dtype(v)
    cos, sin = position_embeddings  # (B, T, D)
    cos5 = cos[:, None, None]
    sin5 = per_pass.derive("sin", sin, sign_folded)[:, None, None]
    q = rotated(q, cos5, sin5, dtype).view(b, hkv, g * t, d)
    k = rotated(k, cos5, sin5, dtype).view(b, hkv, t, d)
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, Hkv, G·T, T)
    scores.mul_(self.scaling)
    mask = per_pass.derive("mask", attention_mask, mask_in(scores.dtype))
    scores.view(b, hkv, g, t, t).add_(mask[:, :, None, :, :t])
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights.to(v.dtype), v)  # (B, Hkv, G·T, D)
    out = out.view(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hkv * g * d)
    return self.o_proj(out), None


def _fits(module: torch.nn.Module) -> bool:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "config")
    return (
        type(module).__name__ in LEAN_ATTENTION
        and all(hasattr(module, n) for n in names)
        and all(hasattr(module, n) for n in ("head_dim", "num_key_value_groups", "scaling"))
    )


def lean_attention(model: torch.nn.Module) -> int:
    """Give the Llama-family attention modules of `model` the lean inference forward; returns
    how many. Their own forward stays for training, caches and other attention kernels."""
    per_pass = PerPass()
    count = 0
    for module in model.modules():
        if _fits(module) and not hasattr(module, "_finlora_plain_forward"):
            module._finlora_plain_forward = module.forward  # type: ignore[assignment]
            module._finlora_per_pass = per_pass  # type: ignore[assignment]
            module.forward = types.MethodType(_lean_forward, module)  # type: ignore[method-assign]
            count += 1
    return count
