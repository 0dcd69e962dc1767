"""Norm outputs cast to the autocast dtype once, for bf16 inference.

Under autocast every linear layer casts its fp32 input to bf16 itself. In a Llama-style decoder
layer the input norm feeds q, k and v, and the post-attention norm feeds gate and up, so each
norm output is cast three and two times: on a 2-core AMX CPU, `copy_` took 19% of a scoring
pass. Cast once as the norm's last step, the linear layers receive the same bf16 values and
compute the same scores to the bit.

Only without gradients: in training, autograd would then add the q, k and v input gradients in
bf16 instead of fp32. Only for layers known to feed the norms to nothing but those projections
(a Gemma layer, for one, adds its post-attention norm's output to the residual stream).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

# Decoder layers whose input_layernorm feeds only self_attn's q/k/v projections and whose
# post_attention_layernorm feeds only the MLP's gate/up projections.
LLAMA_STYLE_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
CONSUMERS = {
    "input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj")),
}


def _cast_output(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> Any:
    if torch.is_grad_enabled():
        return None
    device = output.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return output.to(torch.get_autocast_dtype(device))


def _only_casts_its_input(layer: Any) -> bool:
    """A plain linear layer, or a plain LoRA one (no DoRA or other variant): under autocast
    either does nothing to its input but cast it (PEFT's cast back to fp32 for lora_A is
    undone, losslessly, by autocast)."""
    if type(layer) is torch.nn.Linear:
        return True
    return isinstance(layer, LoraLinear) and not layer.lora_variant


def cast_norms_once(model: torch.nn.Module) -> int:
    """Hook the norms of Llama-style layers to hand bf16 on under autocast inference; returns
    how many norms were hooked."""
    count = 0
    for layer in model.modules():
        if type(layer).__name__ not in LLAMA_STYLE_LAYERS:
            continue
        for norm_name, (block_name, projections) in CONSUMERS.items():
            block = getattr(layer, block_name, None)
            consumers = [getattr(block, name, None) for name in projections]
            if all(_only_casts_its_input(c) for c in consumers):
                getattr(layer, norm_name).register_forward_hook(_cast_output)
                count += 1
    return count
