"""Llama-family decoder layers trained as two hand-written autograd operations
(`speed.fused_decoder`).

With LoRA on a 2-core CPU under bf16 autocast, the matmuls of a training step are the smaller
half of its time: the rest is autograd bookkeeping and the small operations around them, about
400 operator calls per layer and micro-batch (autocast's casts and their backward, PEFT's two
rank-r matmuls per projection, the rotary embedding's fp32 round trips). Here each half of a
layer (attention: x + o(attn(rope(q, k), v)) over norm(x); MLP: x + down(silu(gate)·up) over
norm(x)) is one `torch.autograd.Function` with its backward written out:
- projections that read one input run as one matmul (q, k, v; gate, up), and so do their LoRA
  A matrices: the A rows sit under the frozen weights in one stacked matrix, so x·A comes out
  of the base matmul, and in the backward pass the input's gradient through W and through A is
  again one matmul, and every LoRA update of a stack is one product (`stacked.Stack`);
- every tensor is cast once, to the compute dtype, where it is made; the attention scaling
  rides on the queries' rotary embedding instead of a pass over the (T x T) scores;
- the norms, the rotary embedding and the softmax keep transformers' precision (fp32 norms and
  rotary products, the softmax computed in fp32 and rounded once, as `lean_attention` does);
- packed rows (`train.packing`) take attention one record per row (`segments.Segments`), where
  that computes fewer scores than the packed rows under their block-diagonal mask.

The frozen weights become row slices of the stacked matrices (like `fuse_projections`), so no
memory is added, and the LoRA parameters, their gradients and the saved adapter are PEFT's. A
layer takes this path only while training with gradients, eager attention, one active unmerged
LoRA adapter without dropout or variants on every projection that has one, and frozen,
bias-free projections and norms; anything else runs transformers' and PEFT's own forward.
Tests check the loss and every gradient against that path in fp32 and under bf16 autocast.
On 2 AMX cores a training round of the FPB recipe ran 1.16x faster (docs/benchmarks.md).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from finlora.models.fast.lean_attention import (
    PerPass,
    compute_dtype,
    eager_call_without_cache,
    mask_in,
    rotated,
    sign_folded,
)
from finlora.models.fast.lean_mlp import is_silu_gated_mlp
from finlora.models.fast.segments import Segments
from finlora.models.fast.stacked import Stack, lora_parts, rank_of

DECODER_LAYERS = ("LlamaDecoderLayer",)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj")


def _active_adapter(lora: Any) -> str | None:
    """The adapter a LoRA layer applies, when this path computes just what PEFT would."""
    adapters = lora.active_adapters
    if lora.disable_adapters or lora.merged or len(adapters) != 1:
        return None
    name = adapters[0]
    if name not in lora.lora_A or name in lora.lora_variant:
        return None
    if not isinstance(lora.lora_dropout[name], torch.nn.Identity):
        return None
    if lora.lora_B[name].bias is not None or lora.lora_A[name].bias is not None:
        return None
    return name


def _norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's RMSNorm of fp32 rows x (N, d) -> (output in `dtype`, 1/rms (N, 1))."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * rstd * weight).to(dtype), rstd


def _norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """residual + the gradient of RMSNorm's input, from its output's gradient (all fp32)."""
    g = grad * weight  # fp32: the product promotes a bf16 grad
    coef = (g * x).mean(-1, keepdim=True) * rstd.pow(3)
    return torch.addcmul(residual, g, rstd).addcmul_(x, coef, value=-1)


class _Geometry:
    """Batch, length and head sizes of one attention call: (b, t) the packed rows' (B, T), or
    the records' layout (S, L)."""

    def __init__(self, b: int, t: int, attn: Any) -> None:
        self.b, self.t = b, t
        self.d = attn.head_dim
        self.g = attn.num_key_value_groups
        self.hkv = attn.config.num_key_value_heads
        self.q_cols = self.hkv * self.g * self.d
        self.kv_cols = self.hkv * self.d

    def heads(self, cols: torch.Tensor, group: int) -> torch.Tensor:
        """(N, Hkv·group·D) -> (B, Hkv, group, T, D) view, query heads grouped by the key/value
        head they use (transformers' repeat_kv)."""
        return cols.view(self.b, self.t, self.hkv, group, self.d).permute(0, 2, 3, 1, 4)


class _AttentionHalf(torch.autograd.Function):
    """x + o_proj(attention(rope(q), rope(k), v)) of norm(x), x (B, T, d) fp32."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        layer: Any,
        segments: Segments | None,
        mask: torch.Tensor,
        cos: torch.Tensor,
        sin_folded: torch.Tensor,
        cos_q: torch.Tensor,
        sin_q: torch.Tensor,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        """cos_q, sin_q: cos and sin_folded times the attention's scaling, which the queries
        take in their rotary embedding instead of the (T x T) scores taking it. With
        `segments`, the mask and the rotary tensors are in the records' layout."""
        state: _LayerState = layer._finlora_fused
        attn = layer.self_attn
        seg: Segments | None = segments
        b, t = (seg.rows, seg.length) if seg else (x.size(0), x.size(1))
        geo = _Geometry(b, t, attn)
        dtype = state.qkv.weight.dtype
        n_qkv = 2 * len(state.qkv.members)  # an A and a B each
        p_qkv, p_o = list(params[:n_qkv]), list(params[n_qkv:])
        rows = x.reshape(-1, x.size(-1))
        normed, rstd = _norm_forward(
            rows, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, dtype
        )
        qkv, xa_qkv, lift_qkv = state.qkv.forward(normed, p_qkv)
        if seg is not None:
            qkv = seg.laid_out(qkv)
        cos5, sin5 = cos[:, None, None], sin_folded[:, None, None]
        cos5_q, sin5_q = cos_q[:, None, None], sin_q[:, None, None]
        b, t, d, g, hkv = geo.b, geo.t, geo.d, geo.g, geo.hkv
        q_heads = geo.heads(qkv[:, : geo.q_cols], g)
        q = rotated(q_heads, cos5_q, sin5_q, dtype).view(b, hkv, g * t, d)
        k_cols = qkv[:, geo.q_cols : geo.q_cols + geo.kv_cols]
        k = rotated(geo.heads(k_cols, 1), cos5, sin5, dtype).view(b, hkv, t, d)
        v = geo.heads(qkv[:, geo.q_cols + geo.kv_cols :], 1).reshape(b, hkv, t, d)
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, Hkv, G·T, T), scaled
        scores.view(b, hkv, g, t, t).add_(mask[:, :, None, :, :t])
        probs = torch.softmax(scores, dim=-1)
        heads_out = torch.matmul(probs, v)  # (B, Hkv, G·T, D)
        merged = heads_out.view(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b * t, -1)
        if seg is not None:
            merged = seg.packed(merged)
        out, xa_o, lift_o = state.o.forward(merged, p_o)
        ctx.layer, ctx.geo, ctx.segments = layer, geo, seg
        ctx.lifts = (lift_qkv, lift_o)
        rope = (cos, sin_folded, cos_q, sin_q)
        ctx.save_for_backward(rows, rstd, normed, xa_qkv, q, k, v, probs, merged, xa_o, *rope)
        return (rows + out).view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, rstd, normed, xa_qkv, q, k, v, probs, merged, xa_o, *rope = ctx.saved_tensors
        cos, sin, cos_q, sin_q = (r[:, None, None] for r in rope)
        layer, geo, seg = ctx.layer, ctx.geo, ctx.segments
        state: _LayerState = layer._finlora_fused
        b, t, d, g, hkv = geo.b, geo.t, geo.d, geo.g, geo.hkv
        p_qkv, p_o = state.qkv.params(), state.o.params()
        lift_qkv, lift_o = ctx.lifts
        g_rows = grad.reshape(-1, grad.size(-1))
        g_o = state.o.grad_buffer(g_rows.size(0))
        g_o[:, : state.o.out_total] = g_rows
        grads_o = state.o.backward(g_o, merged, xa_o, lift_o, p_o)
        g_merged = state.o.input_grad(g_o)
        if seg is not None:
            g_merged = seg.laid_out_grad(g_merged)
        g_heads = geo.heads(g_merged, g).reshape(b, hkv, g * t, d)
        g_probs = torch.matmul(g_heads, v.transpose(-1, -2))
        g_v = torch.matmul(probs.transpose(-1, -2), g_heads)  # sums over the group's queries
        g_scores = torch._softmax_backward_data(g_probs, probs, -1, probs.dtype)
        g_q = torch.matmul(g_scores, k)
        g_k = torch.matmul(g_scores.transpose(-1, -2), q)
        g_qkv = state.qkv.grad_buffer(g_rows.size(0))
        # Written in place where the layout is the packed rows', else laid out and moved back.
        g_att = g_qkv if seg is None else g_qkv.new_empty(b * t, state.qkv.out_total)
        _unrotate(g_q.view(b, hkv, g, t, d), cos_q, sin_q, geo.heads(g_att[:, : geo.q_cols], g))
        k_cols = g_att[:, geo.q_cols : geo.q_cols + geo.kv_cols]
        _unrotate(g_k.view(b, hkv, 1, t, d), cos, sin, geo.heads(k_cols, 1))
        geo.heads(g_att[:, geo.q_cols + geo.kv_cols : state.qkv.out_total], 1).copy_(
            g_v.view(b, hkv, 1, t, d)
        )
        if seg is not None:
            g_qkv[:, : state.qkv.out_total] = seg.packed(g_att)
        grads_qkv = state.qkv.backward(g_qkv, normed, xa_qkv, lift_qkv, p_qkv)
        # The first layer's input (the frozen embeddings' output) needs no gradient: that
        # skips the stack's largest backward matmul and the norm's backward.
        g_x = None
        if ctx.needs_input_grad[0]:
            g_normed = state.qkv.input_grad(g_qkv)
            norm = layer.input_layernorm
            g_x = _norm_backward(g_normed, rows, rstd, norm.weight, g_rows).view(grad.shape)
        return (g_x, None, None, None, None, None, None, None, *grads_qkv, *grads_o)


def _unrotate(
    grad: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor, out: torch.Tensor
) -> None:
    """The gradient of `rotated` (x·cos + swap(x)·sin_folded), written into `out`: the swap of
    x's halves is its own transpose, so it is grad·cos + swap(grad·sin_folded)."""
    half = grad.size(-1) // 2
    t = grad * sin_folded
    torch.add(grad * cos, t.unflatten(-1, (2, half)).flip(-2).flatten(-2), out=out)


class _MlpHalf(torch.autograd.Function):
    """x + down(silu(gate) · up) of norm(x), x (B, T, d) fp32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: Any, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        state: _LayerState = layer._finlora_fused
        dtype = state.gate_up.weight.dtype
        n_gu = 2 * len(state.gate_up.members)
        p_gu, p_down = list(params[:n_gu]), list(params[n_gu:])
        rows = x.reshape(-1, x.size(-1))
        norm = layer.post_attention_layernorm
        normed, rstd = _norm_forward(rows, norm.weight, norm.variance_epsilon, dtype)
        gate_up, xa_gu, lift_gu = state.gate_up.forward(normed, p_gu)
        width = state.gate_up.sizes[0]
        gate, up = gate_up[:, :width], gate_up[:, width:]
        hidden = F.silu(gate) * up
        out, xa_down, lift_down = state.down.forward(hidden, p_down)
        ctx.layer, ctx.lifts = layer, (lift_gu, lift_down)
        # `hidden` is not kept: the backward pass recomputes it from gate and up (the same ops,
        # so the same values) at the cost of one product, keeping a sixth less per token.
        ctx.save_for_backward(rows, rstd, normed, xa_gu, gate_up, xa_down)
        return (rows + out).view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, rstd, normed, xa_gu, gate_up, xa_down = ctx.saved_tensors
        layer = ctx.layer
        state: _LayerState = layer._finlora_fused
        lift_gu, lift_down = ctx.lifts
        n = rows.size(0)
        width = state.gate_up.sizes[0]
        gate, up = gate_up[:, :width], gate_up[:, width:]
        silu_gate = F.silu(gate)
        hidden = silu_gate * up
        g_rows = grad.reshape(-1, grad.size(-1))
        g_down = state.down.grad_buffer(n)
        g_down[:, : state.down.out_total] = g_rows
        grads_down = state.down.backward(g_down, hidden, xa_down, lift_down, state.down.params())
        g_hidden = state.down.input_grad(g_down)
        g_gu = state.gate_up.grad_buffer(n)
        # The same aten ops as autograd's MulBackward0 and SiluBackward0 (see lean_mlp).
        g_gu[:, :width] = torch.ops.aten.silu_backward(g_hidden * up, gate)
        torch.mul(g_hidden, silu_gate, out=g_gu[:, width : 2 * width])
        grads_gu = state.gate_up.backward(g_gu, normed, xa_gu, lift_gu, state.gate_up.params())
        g_normed = state.gate_up.input_grad(g_gu)
        norm = layer.post_attention_layernorm
        g_x = _norm_backward(g_normed, rows, rstd, norm.weight, g_rows)
        return (g_x.view(grad.shape), None, *grads_gu, *grads_down)


class _LayerState:
    """A decoder layer's stacked projections."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = Stack([getattr(attn, n) for n in ATTENTION_PROJECTIONS])
        self.o = Stack([attn.o_proj])
        self.gate_up = Stack([getattr(mlp, n) for n in MLP_PROJECTIONS])
        self.down = Stack([mlp.down_proj])
        self.stacks = (self.qkv, self.o, self.gate_up, self.down)
        self.modules = _projections(layer)

    def current(self, layer: Any) -> bool:
        """Still the layer's projections (a merge unloads the LoRA layers), with their weights
        still views of the stacks (a `.to()` copies them)."""
        same = all(a is b for a, b in zip(_projections(layer), self.modules, strict=True))
        return same and all(s.intact() for s in self.stacks)

    def runnable(self) -> bool:
        """Every LoRA layer applies one adapter this path computes, of the rank it was built
        for."""
        return all(
            _active_adapter(lora) is not None and rank_of(lora) == rank
            for s in self.stacks
            for lora, rank in zip(s.loras, s.ranks, strict=True)
            if lora is not None
        )


def _projections(layer: Any) -> list[Any]:
    attn, mlp = layer.self_attn, layer.mlp
    found = [getattr(attn, n, None) for n in (*ATTENTION_PROJECTIONS, "o_proj")]
    return found + [getattr(mlp, n, None) for n in (*MLP_PROJECTIONS, "down_proj")]


def _fits(layer: torch.nn.Module) -> bool:
    """A Llama decoder layer whose parts this path computes exactly."""
    if type(layer).__name__ not in DECODER_LAYERS:
        return False
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or not is_silu_gated_mlp(mlp):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in (attn, mlp)):
        return False  # this path calls neither: a hook on them (a bottleneck adapter) would not run
    parts = [None if p is None else lora_parts(p) for p in _projections(layer)]
    if any(part is None for part in parts):
        return False
    bases = [part[0] for part in parts if part is not None]
    if all(part[1] is None for part in parts if part is not None):
        return False  # no LoRA here: nothing to train
    norms: list[Any] = [layer.input_layernorm, layer.post_attention_layernorm]
    if any(w.requires_grad for w in [*(b.weight for b in bases), *(n.weight for n in norms)]):
        return False
    same_dtype = len({b.weight.dtype for b in bases}) == 1
    return same_dtype and getattr(attn.config, "attention_dropout", 0.0) == 0.0


def _fused_forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    position_embeddings = kwargs.get("position_embeddings")
    training = self.training and torch.is_grad_enabled() and not args
    plain = eager_call_without_cache(
        self.self_attn.config, position_embeddings, attention_mask, kwargs
    )
    # fp32 hidden states: the residual stream and the norms stay in fp32, as transformers has it.
    takes_path = training and plain and not kwargs.get("use_cache")
    takes_path = takes_path and hidden_states.dtype == torch.float32
    state: _LayerState | None = self._finlora_fused
    if state is not None and not state.current(self):
        state = self._finlora_fused = None  # merged or moved: let the stacks go
    if takes_path and state is None and _fits(self):
        state = self._finlora_fused = _LayerState(self)
    # The stacks compute in their weights' dtype: it must be autocast's (or fp32 without it).
    runs = state is not None and compute_dtype(hidden_states) == state.qkv.weight.dtype
    if not (takes_path and runs and state is not None and state.runnable()):
        return self._finlora_plain_forward(hidden_states, attention_mask, *args, **kwargs)
    assert attention_mask is not None and position_embeddings is not None
    dtype = state.qkv.weight.dtype
    per_pass: PerPass = self._finlora_per_pass
    cos, sin = position_embeddings
    sin_folded = per_pass.derive("sin", sin, sign_folded)
    scaling = self.self_attn.scaling
    cos_q = per_pass.derive(f"cos*{scaling}", cos, lambda c: c * scaling)
    sin_q = per_pass.derive(f"sin*{scaling}", sin, lambda s: sign_folded(s) * scaling)
    rope = [cos, sin_folded, cos_q, sin_q]
    position_ids = kwargs.get("position_ids")
    segments = None
    if position_ids is not None:
        segments = per_pass.derive("segments", position_ids, Segments.worth_it)
    if segments is None:
        mask = per_pass.derive(f"mask-{dtype}", attention_mask, mask_in(dtype))
    else:  # packed rows: attention one record per row, transformers' (B, 1, T, T) mask unused
        laid_out = segments  # bound for the lambdas below
        mask = per_pass.derive(f"causal-{dtype}", laid_out.index, lambda _: laid_out.causal(dtype))
        rope = [per_pass.derive(f"rope{i}", r, laid_out.per_token) for i, r in enumerate(rope)]
    params = (*state.qkv.params(), *state.o.params())
    with torch.autocast(hidden_states.device.type, enabled=False):
        hidden = _AttentionHalf.apply(hidden_states, self, segments, mask, *rope, *params)
        return _MlpHalf.apply(hidden, self, *state.gate_up.params(), *state.down.params())


def fused_decoders(model: torch.nn.Module) -> int:
    """Give every Llama decoder layer of `model` that this path can train the fused forward;
    returns how many. The stacked weights are built at the first training pass."""
    per_pass = PerPass()
    count = 0
    for module in model.modules():
        if _fits(module) and not hasattr(module, "_finlora_plain_forward"):
            layer: Any = module
            layer._finlora_plain_forward = layer.forward
            layer._finlora_per_pass = per_pass
            layer._finlora_fused = None
            layer.forward = types.MethodType(_fused_forward, layer)
            count += 1
    return count
