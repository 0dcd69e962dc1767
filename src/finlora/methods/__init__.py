"""Tuning methods, one small module each, behind one builder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finlora.config import RunConfig
from finlora.methods import lora

Builder = Callable[[Any, RunConfig, str], Any]

METHODS: dict[str, Builder] = {"lora": lora.build}


def build_method(model: Any, cfg: RunConfig, kind: str, method: str = "lora") -> Any:
    """Wrap `model` (a transformers model of `kind`) with the configured tuning method."""
    return METHODS[method](model, cfg, kind)


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
