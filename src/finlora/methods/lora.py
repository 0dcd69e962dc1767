"""LoRA (Hu et al., 2021) through PEFT: h = W0·x + (lora_alpha / r) · B·A·x.

A starts Gaussian and B at zero, so the adapted model begins exactly as the base model.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from peft import LoraConfig, get_peft_model

from finlora.config import RunConfig
from finlora.methods.peft_task import task_options

KINDS = ("causal", "seq2seq", "encoder")


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    section = cfg.lora
    peft_config = LoraConfig(
        r=section.r,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=section.target_modules,
        bias=cast(Literal["none", "all", "lora_only"], section.bias),  # checked by the config
        init_lora_weights="gaussian",
        **task_options(model, kind),
    )
    return get_peft_model(model, peft_config)
