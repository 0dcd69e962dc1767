"""Prefix tuning (Li & Liang, 2021) through PEFT: trained key/value vectors that every attention
layer sees before the real tokens, passed to the model as past key values."""

from __future__ import annotations

from typing import Any

from peft import PrefixTuningConfig, get_peft_model

from finlora.config import RunConfig
from finlora.methods.peft_task import task_options

# An encoder classifier takes no past key values, so there is nowhere to put the prefix.
KINDS = ("causal", "seq2seq")


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    section = cfg.prefix
    peft_config = PrefixTuningConfig(
        num_virtual_tokens=section.num_virtual_tokens,
        prefix_projection=section.prefix_projection,
        encoder_hidden_size=section.encoder_hidden_size,
        **task_options(model, kind),
    )
    return get_peft_model(model, peft_config)
