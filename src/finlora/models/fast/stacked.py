"""Projections that read one input, trained as one stacked weight (`speed.fused_decoder`).

The frozen weights of q, k and v (or gate and up, or one projection alone) become row slices of
one matrix, and the LoRA A matrices of those that have one sit under them: x·Aᵀ comes out of the
base matmul, and in the backward pass the input's gradient through W and through A is again one
matmul. Every LoRA update of a stack, s·(x·Aᵀ)·Bᵀ, is one product with a block-diagonal matrix
of the scaled Bᵀs. No memory is added: each base weight becomes a view of its rows.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from finlora.models.fast.fused_lora import plain_linear


def lora_parts(module: torch.nn.Module) -> tuple[torch.nn.Linear, Any] | None:
    """(base linear, LoRA layer or None) for a projection this path can run, else None."""
    if plain_linear(module):
        linear: Any = module
        return (linear, None) if linear.bias is None else None
    lora: Any = module
    if not (isinstance(lora, LoraLinear) and plain_linear(lora.base_layer)):
        return None
    if lora.fan_in_fan_out or lora.base_layer.bias is not None:
        return None
    return lora.base_layer, lora


class Stack:
    """Projections that read one input, as one stacked weight: the frozen weights' rows, then
    one slot of r rows for each LoRA A matrix, refreshed from the fp32 parameter at every
    forward pass. Each base layer's weight is a view of its rows."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        parts = [lora_parts(m) for m in modules]
        assert all(p is not None for p in parts)
        self.bases = [p[0] for p in parts if p is not None]
        self.loras = [p[1] for p in parts if p is not None]
        self.sizes = [b.out_features for b in self.bases]
        self.out_total = sum(self.sizes)
        self.ranks = [0 if lora is None else rank_of(lora) for lora in self.loras]
        first = self.bases[0].weight
        rows = self.out_total + sum(self.ranks)
        with torch.no_grad():
            self.weight = torch.zeros(rows, first.size(1), dtype=first.dtype, device=first.device)
            start = 0
            for base, size in zip(self.bases, self.sizes, strict=True):
                self.weight[start : start + size] = base.weight
                view = self.weight[start : start + size]
                base.weight = torch.nn.Parameter(view, requires_grad=False)
                start += size
        self.members = self._members()

    def intact(self) -> bool:
        """Every base weight still a view of the stacked matrix (a `.to()` or merge breaks it)."""
        stacked = self.weight.untyped_storage().data_ptr()
        return all(b.weight.untyped_storage().data_ptr() == stacked for b in self.bases)

    def _members(self) -> list[tuple[slice, slice, Any]]:
        """(output columns, rank columns, LoRA layer) of each member with LoRA."""
        out, rank, found = 0, 0, []
        for size, r, lora in zip(self.sizes, self.ranks, self.loras, strict=True):
            if lora is not None:
                found.append((slice(out, out + size), slice(rank, rank + r), lora))
            out, rank = out + size, rank + r
        return found

    def params(self) -> list[torch.Tensor]:
        """The LoRA A and B weights, in `members` order: what the autograd op differentiates."""
        found = []
        for _, _, lora in self.members:
            name = lora.active_adapters[0]
            found += [lora.lora_A[name].weight, lora.lora_B[name].weight]
        return found

    def forward(
        self, x: torch.Tensor, params: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d_in) in the weight's dtype -> (outputs (N, out_total), x·Aᵀ (N, Σr), the
        members' scaled Bᵀ as one block-diagonal (Σr, out_total) matrix in that dtype)."""
        members = self.members
        with torch.no_grad():
            for (_, ranks, _), a in zip(members, params[0::2], strict=True):
                self.weight[self.out_total + ranks.start : self.out_total + ranks.stop] = a
        y = x @ self.weight.t()  # (N, out_total + Σr): base outputs and x·Aᵀ in one GEMM
        out, xa = y[:, : self.out_total], y[:, self.out_total :]
        # One product adds every member's update: s·(x·Aᵀ)·Bᵀ, block by block.
        lift = self.weight.new_zeros(self.weight.size(0) - self.out_total, self.out_total)
        for (cols, ranks, lora), b in zip(members, params[1::2], strict=True):
            torch.mul(b.t(), scaling_of(lora), out=lift[ranks, cols])
        out.addmm_(xa, lift)
        return out, xa.clone(), lift

    def grad_buffer(self, rows: int) -> torch.Tensor:
        """Where the caller writes the outputs' gradient (first out_total columns); the rank
        columns take the gradient of x·Aᵀ."""
        return self.weight.new_empty(rows, self.weight.size(0))

    def backward(
        self,
        grads: torch.Tensor,
        x: torch.Tensor,
        xa: torch.Tensor,
        lift: torch.Tensor,
        params: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """grads: `grad_buffer` with the outputs' gradient written -> the gradients of
        `params`; the rank columns of `grads` are filled in for `input_grad`."""
        g_out, g_xa = grads[:, : self.out_total], grads[:, self.out_total :]
        g_xa.addmm_(g_out, lift.t(), beta=0)  # beta=0: ignores what the buffer held
        g_lift = xa.t() @ g_out  # (Σr, out_total): the off-diagonal blocks are unused
        grad_a = g_xa.t() @ x  # (Σr, d_in): every A's gradient in one GEMM
        out = []
        for (cols, ranks, lora), a, b in zip(self.members, params[0::2], params[1::2], strict=True):
            grad_b = g_lift[ranks, cols].t() * scaling_of(lora)
            out += [grad_a[ranks].to(a.dtype), grad_b.to(b.dtype)]
        return out

    def input_grad(self, grads: torch.Tensor) -> torch.Tensor:
        """x's gradient, through W and A at once, from the buffer `backward` completed."""
        return grads @ self.weight


def rank_of(lora: Any) -> int:
    return int(lora.lora_A[lora.active_adapters[0]].weight.size(0))


def scaling_of(lora: Any) -> float:
    return float(lora.scaling[lora.active_adapters[0]])
