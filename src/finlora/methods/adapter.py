"""Bottleneck adapters (Houlsby et al., 2019): h + up(f(down(h))) on a sublayer's output h,
before the block adds it to its residual stream.

PEFT 0.21 has no such method (its adapters are LoRA-like weight updates, prompt methods, or
ShadowPEFT's side network), and AdapterHub's `adapters` needs another transformers, so here is
the small module. `up` starts at zero, so the adapted model begins exactly as the base model.
Houlsby places one after each block's attention and one after its feed-forward part; Pfeiffer
et al. (2021) only the second. Each adapter is a child of its block (its weights are named
`...layers.3.mlp_adapter.adapter_down.weight`) and runs from a forward hook on the sublayer, so
the model's own modules and forwards stay as they were.

The up(f(down(h))) is not linear in h, so nothing can be merged into the model's weights: the
run is scored with its adapters, and `finlora export` refuses it. Weights are stored as tensors
(`storage: tensors`): building the method again gives the same modules to load them into.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from finlora.config import RunConfig
from finlora.errors import FinloraError
from finlora.methods.peft_task import head_modules

KINDS = ("causal", "seq2seq", "encoder")

NON_LINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

# A block's attention and feed-forward outputs, by path inside the block, first found wins:
# Llama-family and GPT-2 (self_attn / attn, mlp); BERT-like (the dense layer before the residual
# add and its norm); DistilBERT (out_lin, lin2); T5 (the attention and the feed-forward module
# inside their sublayers; a decoder block's feed-forward sublayer comes after cross-attention).
ATTENTION_OUTPUTS = ("self_attn", "attn", "attention.output.dense", "attention.out_lin",
                     "layer.0.SelfAttention")  # fmt: skip
FEED_FORWARD_OUTPUTS = ("mlp", "output.dense", "ffn.lin2", "layer.2.DenseReluDense",
                        "layer.1.DenseReluDense")  # fmt: skip
# Where each sublayer's adapter sits in the block.
ADAPTER_NAMES = {"attention": "attention_adapter", "feed_forward": "mlp_adapter"}


class Bottleneck(nn.Module):
    """h + up(f(down(h))), with `up` at zero to start."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(hidden, bottleneck)
        self.non_linearity = NON_LINEARITIES[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.non_linearity(self.adapter_down(h))  # (B, T, bottleneck)
        return h + self.adapter_up(z).to(h.dtype)  # (B, T, hidden)


def _apply_to_output(adapter: Bottleneck) -> Any:
    """A forward hook that passes the sublayer's output through `adapter`. Attention modules
    return a tuple whose first item is the output (then weights, caches)."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def _first(block: nn.Module, paths: tuple[str, ...]) -> nn.Module | None:
    for path in paths:
        try:
            return block.get_submodule(path)
        except AttributeError:
            continue
    return None


def blocks(model: nn.Module) -> Iterator[tuple[nn.Module, dict[str, nn.Module]]]:
    """Each transformer block of `model` with its sublayers' output modules, by role."""
    for module in model.modules():
        attention = _first(module, ATTENTION_OUTPUTS)
        feed_forward = _first(module, FEED_FORWARD_OUTPUTS)
        if attention is not None and feed_forward is not None:
            yield module, {"attention": attention, "feed_forward": feed_forward}


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    section = cfg.adapter
    roles = ("attention", "feed_forward") if section.placement == "houlsby" else ("feed_forward",)
    hidden = int(model.config.hidden_size)
    bottleneck = max(1, hidden // section.reduction_factor)
    model.requires_grad_(False)
    found = list(blocks(model))
    if not found:
        raise FinloraError(
            f"method adapter: cannot find the attention and feed-forward sublayers of "
            f"{type(model).__name__}'s blocks"
        )
    for block, outputs in found:
        for role in roles:
            adapter = Bottleneck(hidden, bottleneck, section.non_linearity)
            block.add_module(ADAPTER_NAMES[role], adapter)
            outputs[role].register_forward_hook(_apply_to_output(adapter))
    if kind == "encoder":
        # A classifier's head starts random: it trains beside the adapters (and is saved).
        for name in head_modules(model):
            model.get_submodule(name).requires_grad_(True)
    return model
