"""Freeze tuning: only the top `freeze.layers` transformer blocks train, with what follows them
(the final norm; an encoder's pooler) and an encoder classifier's head. Everything below stays
as pre-trained: the lower layers hold general language, the top ones adapt to the task."""

from __future__ import annotations

from typing import Any

import torch

from finlora.config import RunConfig
from finlora.errors import FinloraError
from finlora.methods.peft_task import head_modules

KINDS = ("causal", "seq2seq", "encoder")


def _stack(model: Any, kind: str) -> torch.nn.Module:
    """The stack whose top blocks train: the decoder of an LM, the encoder of a classifier."""
    return model.base_model if kind == "encoder" else model.get_decoder()


def _blocks(stack: torch.nn.Module) -> torch.nn.ModuleList:
    # Modules are visited outer first, so the first list met is the list of blocks, not a list
    # inside a block (T5Block keeps its sublayers in one).
    for module in stack.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            return module
    raise FinloraError(f"freeze: cannot find the transformer blocks of {type(stack).__name__}")


def _after(stack: torch.nn.Module, blocks: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """The stack's children that come after the blocks (final norm, pooler)."""
    children = list(stack.children())
    index = next(i for i, c in enumerate(children) if any(m is blocks for m in c.modules()))
    return children[index + 1 :]


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    stack = _stack(model, kind)
    blocks = _blocks(stack)
    layers = cfg.freeze.layers
    if layers > len(blocks):
        raise FinloraError(
            f"config: freeze.layers={layers} but the model has {len(blocks)} blocks to train"
        )
    model.requires_grad_(False)
    for module in [*blocks[-layers:], *_after(stack, blocks)]:
        module.requires_grad_(True)
    if kind == "encoder":
        for name in head_modules(model):
            model.get_submodule(name).requires_grad_(True)
    return model
