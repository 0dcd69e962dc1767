"""(IA)^3 (Liu et al., 2022) through PEFT: learned vectors l that rescale activations,
k' = l_k ⊙ k, v' = l_v ⊙ v, and the input of the feed-forward output layer. They start at 1,
so the adapted model begins exactly as the base model."""

from __future__ import annotations

from typing import Any

from peft import IA3Config, get_peft_model

from finlora.config import RunConfig
from finlora.methods.peft_task import task_options

KINDS = ("causal", "seq2seq", "encoder")


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    section = cfg.ia3
    peft_config = IA3Config(
        target_modules=section.target_modules,
        feedforward_modules=section.feedforward_modules,
        **task_options(model, kind),
    )
    return get_peft_model(model, peft_config)
