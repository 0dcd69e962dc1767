"""Gated MLPs that keep less for the backward pass.

A Llama-family MLP computes down(silu(gate(x)) * up(x)). Autograd keeps gate(x) for the SiLU's
backward and both factors of the product for the multiply's, so silu(gate(x)) is kept beside the
gate it is a function of: with the product (kept by down's LoRA), four (tokens x intermediate)
tensors a layer, half of all activations saved in training. `SiluMul` keeps gate and up only and
recomputes the SiLU in the backward pass with the ops autograd would run, so the gradients are
the same bit for bit, for one more elementwise pass.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward pass."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        # The same aten ops as autograd's MulBackward0 and SiluBackward0, in the same order.
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def _lean_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


# torch's SiLU module and transformers' (ACT2FN["silu"]), which computes F.silu as well.
SILU_MODULES = ("SiLU", "SiLUActivation")


def is_silu_gated_mlp(module: torch.nn.Module) -> bool:
    """A Llama-style MLP: gate, up and down projections with a SiLU on the gate."""
    has_projections = all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
    return has_projections and type(getattr(module, "act_fn", None)).__name__ in SILU_MODULES


def lean_mlps(model: torch.nn.Module) -> int:
    """Give every SiLU-gated MLP the forward that keeps less; returns how many."""
    count = 0
    for module in model.modules():
        if is_silu_gated_mlp(module):
            module.forward = types.MethodType(_lean_forward, module)  # type: ignore[method-assign]
            count += 1
    return count
