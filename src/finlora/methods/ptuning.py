"""P-tuning (Liu et al., 2021) through PEFT: virtual token embeddings produced by a small prompt
encoder (MLP or LSTM) and prepended to every input; only the encoder trains."""

from __future__ import annotations

from typing import Any

from peft import PromptEncoderConfig, get_peft_model

from finlora.config import RunConfig
from finlora.methods.peft_task import task_options

KINDS = ("causal", "seq2seq", "encoder")


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    section = cfg.ptuning
    peft_config = PromptEncoderConfig(
        num_virtual_tokens=section.num_virtual_tokens,
        encoder_hidden_size=section.encoder_hidden_size,
        encoder_reparameterization_type=section.encoder_reparameterization_type,
        **task_options(model, kind),
    )
    return get_peft_model(model, peft_config)
