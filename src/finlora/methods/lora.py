"""LoRA (Hu et al., 2021) through PEFT: h = W0·x + (lora_alpha / r) · B·A·x.

A starts Gaussian and B at zero, so the adapted model begins exactly as the base model.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, TaskType, get_peft_model

from finlora.config import RunConfig

TASK_TYPES = {"causal": TaskType.CAUSAL_LM, "seq2seq": TaskType.SEQ_2_SEQ_LM}


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    section = cfg.lora
    peft_config = LoraConfig(
        task_type=TASK_TYPES[kind],
        r=section.r,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=section.target_modules,
        bias=section.bias,  # type: ignore[arg-type]  # checked against LORA_BIASES
        init_lora_weights="gaussian",
    )
    return get_peft_model(model, peft_config)
