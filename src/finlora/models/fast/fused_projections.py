"""Projections that read the same input computed as one GEMM, for inference
(`speed.fuse_projections`).

In a Llama-style layer q, k and v read the same normed hidden states, and so do the MLP's gate
and up: five GEMMs of the same rows a layer. Stacked into one (d_q + d_k + d_v) x d_in weight
and one 2·d_ff x d_in weight they run as two, which on a 2-core CPU saves ~10% of those
matmuls' time (fewer, wider GEMMs; under autocast one cast of the input instead of one per
projection). Each layer's weight becomes a row slice of the stacked tensor, so the parameters,
their values and the state dict's contents stay as they were, and no memory is added.

The layers keep their modules and their callers: the first member of a group to be called
computes every member's output for that input and hands the rest to the others as they ask for
it with the same tensor. Only without gradients, and only while the weights still live in the
stacked tensor (a later `.to()` makes copies): otherwise each layer is a plain `F.linear` again.
Not for a model that will be saved (safetensors refuses tensors that share memory): prediction,
evaluation and serving load their run for inference alone.
"""

from __future__ import annotations

import types
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F

from finlora.models.fast.fused_lora import plain_linear

# Sibling projections that read one input in Llama-family attention and gated MLPs.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """Linear layers whose weights are row slices of one stacked weight."""

    def __init__(self, layers: list[torch.nn.Linear]) -> None:
        with torch.no_grad():
            self.weight = torch.cat([layer.weight for layer in layers])
            has_bias = layers[0].bias is not None
            self.bias = torch.cat([layer.bias for layer in layers]) if has_bias else None
        self.sizes = [layer.out_features for layer in layers]
        start = 0
        for layer, size in zip(layers, self.sizes, strict=True):
            rows = slice(start, start + size)
            layer.weight = _parameter_view(layer.weight, self.weight[rows])
            if self.bias is not None:
                layer.bias = _parameter_view(layer.bias, self.bias[rows])
            start += size
        self.layers = layers
        self._input: torch.Tensor | None = None
        self._outputs: dict[int, torch.Tensor] = {}

    def intact(self) -> bool:
        """Every member's weight (and bias) still a slice of the stacked tensors."""
        stacked = self.weight.untyped_storage().data_ptr()
        return all(
            layer.weight.untyped_storage().data_ptr() == stacked
            and (
                self.bias is None
                or layer.bias.untyped_storage().data_ptr() == self.bias.untyped_storage().data_ptr()
            )  # fmt: skip
            for layer in self.layers
        )

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[index]
        if torch.is_grad_enabled():
            return F.linear(x, layer.weight, layer.bias)
        if self._input is not x or index not in self._outputs:
            if not self.intact():
                return F.linear(x, layer.weight, layer.bias)
            stacked = F.linear(x, self.weight, self.bias)
            self._input = x
            self._outputs = dict(enumerate(stacked.split(self.sizes, dim=-1)))
        out = self._outputs.pop(index)
        if not self._outputs:
            self._input = None  # all handed out: hold no activations between calls
        return out


def _parameter_view(old: torch.Tensor, view: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(view, requires_grad=old.requires_grad)


def _member_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self._finlora_group.output(self._finlora_index, x)


def _fusable(layers: list[Any]) -> TypeGuard[list[torch.nn.Linear]]:
    if not all(plain_linear(layer) for layer in layers):
        return False
    first = layers[0].weight
    return all(
        layer.in_features == layers[0].in_features
        and layer.weight.dtype == first.dtype
        and layer.weight.device == first.device
        and (layer.bias is None) == (layers[0].bias is None)
        for layer in layers
    )


def fuse_projections(model: torch.nn.Module) -> int:
    """Stack the sibling projections of every attention and gated MLP of `model` (plain linear
    layers only: merged or base weights, not LoRA wrappers); returns how many groups."""
    count = 0
    for module in list(model.modules()):
        for names in GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if not _fusable(layers):
                continue
            group = _Group(layers)
            for index, layer in enumerate(layers):
                layer._finlora_group = group  # type: ignore[assignment]
                layer._finlora_index = index  # type: ignore[assignment]
                layer.forward = types.MethodType(_member_forward, layer)  # type: ignore[method-assign]
            count += 1
    return count
