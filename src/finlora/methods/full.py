"""Full fine-tuning: every weight of the model trains (the baseline the PEFT methods approach)."""

from __future__ import annotations

from typing import Any

from finlora.config import RunConfig

KINDS = ("causal", "seq2seq", "encoder")


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    return model.requires_grad_(True)
