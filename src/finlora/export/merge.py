"""The merge: the adapter's update added into the base weights, and proof that it changed them."""

from __future__ import annotations

from typing import Any

import torch

from finlora.errors import FinloraError
from finlora.export.load import ExportContext
from finlora.export.options import DTYPES
from finlora.models.quantize import dequantized_adapter, is_quantized


def merge(ctx: ExportContext, dtype: str) -> tuple[Any, int, int]:
    """Merge in place; returns the plain model and (changed, total) tensor counts at `dtype`."""
    target = DTYPES[dtype]
    if ctx.base_state is not None:  # freeze / full: the model already holds the tuned weights
        base_state = {k: v.to(target) for k, v in ctx.base_state.items()}
        merged = ctx.model
    else:
        if is_quantized(ctx.model):
            # Merged into 4-bit weights the update would be rounded to 4 bits: fp32 first.
            ctx.model = dequantized_adapter(ctx.model)
        base_state = {
            k: v.detach().to(target, copy=True) for k, v in _base_state(ctx.model).items()
        }
        merged = ctx.model.merge_and_unload()
    state = merged.state_dict()
    changed = sum(
        not torch.equal(state[k].to(target), base_state[k]) for k in state if k in base_state
    )
    if changed == 0:
        raise FinloraError(
            f"{ctx.run.root}: the merge left every weight equal to the base model's in {dtype} "
            "(the update is zero or below that precision); nothing exported"
        )
    return merged, changed, len(state)


def _base_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The base model's weights, named as after merge_and_unload, read under the adapter."""
    state = peft_model.get_base_model().state_dict()
    # Under PEFT a wrapped layer's weight is named `...q_proj.base_layer.weight`, and an
    # encoder's trained head keeps its starting copy as `classifier.original_module.weight`.
    return {
        k.replace(".base_layer.", ".").replace(".original_module.", "."): v
        for k, v in state.items()
        if "lora_" not in k and ".modules_to_save." not in k
    }
