"""LoRA layers whose update is added by the base output's own GEMM (`speed.fused_lora`).

PEFT's LoRA layer computes `result + lora_B(lora_A(x)) * scaling`. Beside its two small
matmuls that is a multiply and an add over the whole (tokens x d_out) output, and one more
multiply in the backward pass: full passes over memory that cost ~a third of the non-matmul
time of a CPU training step (SmolLM2: 7 such layers in each of 30 blocks). Here the scaling
rides on the GEMM (alpha) and the product accumulates into the base output in place
(`addmm_`, beta=1), so those passes disappear; under autocast the input is cast to the
autocast dtype once for both matmuls instead of twice.

Same function, same parameters and state dict: only the forward of eligible layers changes,
and anything it does not cover (merged or disabled adapters, several active adapters, DoRA
and other variants, LoRA bias, non-Linear base layers, extra call arguments) takes PEFT's
own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


def plain_linear(module: torch.nn.Module) -> bool:
    """An nn.Linear whose call is just F.linear: no hooks, no replaced forward (as accelerate's
    device-placement hooks do), so computing F.linear directly skips nothing."""
    return (
        type(module) is torch.nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in vars(module)
    )


def _eligible(layer: torch.nn.Module) -> bool:
    return (
        isinstance(layer, LoraLinear)
        and plain_linear(layer.base_layer)
        and not layer.fan_in_fan_out
        and all(b.bias is None for b in layer.lora_B.values())
    )


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = self.active_adapters
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(adapters) != 1
        or adapters[0] not in self.lora_A
        or adapters[0] in self.lora_variant
    ):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # Autocast would cast x separately for each of the two matmuls that read it.
        x = x.to(torch.get_autocast_dtype(device))
    base = self.base_layer
    rows = x.reshape(-1, x.size(-1))  # (N, d_in)
    # The base GEMM's output is a fresh 2-D tensor that linear's backward does not keep, so the
    # update can accumulate into it in place (an in-place op on a view would cost a copy of
    # the gradient in the backward pass).
    result = F.linear(rows, base.weight, base.bias)  # (N, d_out)
    h = self.lora_A[name](self.lora_dropout[name](rows))  # (N, r)
    weight_b = self.lora_B[name].weight  # (d_out, r)
    result.addmm_(h.to(result.dtype), weight_b.to(result.dtype).t(), alpha=self.scaling[name])
    return result.view(*x.shape[:-1], result.size(-1))


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every eligible LoRA layer of `model` the fused forward; returns how many."""
    count = 0
    for module in model.modules():
        if _eligible(module) and not hasattr(module, "_peft_forward"):
            layer: Any = module
            layer._peft_forward = layer.forward
            layer.forward = types.MethodType(_fused_forward, layer)
            count += 1
    return count
