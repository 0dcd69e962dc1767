"""Prompt tuning (Lester et al., 2021) through PEFT: trained embeddings of `num_virtual_tokens`
virtual tokens, prepended to every input; the model itself stays frozen."""

from __future__ import annotations

from typing import Any

from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

from finlora.config import PROMPT_INIT_TEXTS, RunConfig
from finlora.methods.peft_task import task_options

KINDS = ("causal", "seq2seq", "encoder")

INITS = {"text": PromptTuningInit.TEXT, "random": PromptTuningInit.RANDOM}


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    section = cfg.prompt
    text: dict[str, Any] = {}
    if section.init == "text":
        # PEFT tokenizes the init text with the model's own tokenizer, which every model
        # directory finlora loads from holds (its path is the model's name_or_path).
        text = {
            "prompt_tuning_init_text": section.init_text or PROMPT_INIT_TEXTS[cfg.task],
            "tokenizer_name_or_path": model.name_or_path,
            "tokenizer_kwargs": {"local_files_only": True},
        }
    peft_config = PromptTuningConfig(
        num_virtual_tokens=section.num_virtual_tokens,
        prompt_tuning_init=INITS[section.init],
        **text,
        **task_options(model, kind),
    )
    return get_peft_model(model, peft_config)
