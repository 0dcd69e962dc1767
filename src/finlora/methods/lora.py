"""LoRA (Hu et al., 2021) through PEFT: h = W0·x + (lora_alpha / r) · B·A·x, and its variants.

A starts Gaussian and B at zero, so the adapted model begins exactly as the base model. The
`lora` section switches PEFT's variants on: DoRA (`use_dora`), rsLoRA's lora_alpha / sqrt(r)
(`use_rslora`), PiSSA and OLoRA starts (`init`), and LoRA+ learning rates
(`loraplus_lr_ratio`, in `optimizer`).

PiSSA and OLoRA start A and B at a factorisation of the weight's top part and take it out of
the base: W_res = W - s·B0·A0. A saved adapter on W_res would be wrong on any other copy of W,
so `save` writes the trained W_res + s·B·A as what it equals, W + s·[B, -B0]·[A; A0]: a plain
LoRA of rank 2r on the untouched base weights (PEFT's PiSSA/OLoRA-to-LoRA conversion, done
here because PEFT's `path_initial_model_for_weight_conversion` drops the tensors that are not
lora_A/lora_B: an encoder's trained head, DoRA's magnitudes).
"""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from typing import Any, Literal, cast

import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from finlora.config import RunConfig
from finlora.methods import storage
from finlora.methods.hooks import TrainingHooks, adamw
from finlora.methods.peft_task import task_options

KINDS = ("causal", "seq2seq", "encoder")

# Inits that change the base weights, so the saved adapter is converted (module docstring).
MUTATING_INITS = ("pissa", "olora")

# Each such model's starting lora_A and lora_B (PEFT state-dict names), kept beside the model
# for as long as it lives: the conversion at every save needs them.
_INITIAL: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    section = cfg.lora
    peft_config = LoraConfig(
        r=section.r,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=section.target_modules,
        bias=cast(Literal["none", "all", "lora_only"], section.bias),  # checked by the config
        use_dora=section.use_dora,
        use_rslora=section.use_rslora,
        init_lora_weights=cast(Any, section.init),  # checked by the config
        **task_options(model, kind),
    )
    peft_model = get_peft_model(model, peft_config)
    if section.init in MUTATING_INITS:
        _INITIAL[peft_model] = {
            name: tensor.detach().to("cpu", copy=True)
            for name, tensor in get_peft_model_state_dict(peft_model).items()
            if ".lora_A." in name or ".lora_B." in name
        }
    return peft_model


def save(model: Any, directory: Path) -> None:
    """PEFT's adapter files; a PiSSA or OLoRA adapter as the plain LoRA it equals."""
    storage.save_peft(model, directory)
    initial = _INITIAL.get(model)
    if initial is not None:
        _as_plain_lora(directory, initial)


def _as_plain_lora(directory: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite the adapter in `directory`: A' = [A; A0] (2r, d_in), B' = [B, -B0] (d_out, 2r),
    and a config of rank 2r with the same scaling, initialised as plain LoRA."""
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for name, tensor in tensors.items():
        if ".lora_A." in name:
            tensors[name] = torch.cat([tensor, initial[name].to(tensor.dtype)], dim=0)
        elif ".lora_B." in name:
            tensors[name] = torch.cat([tensor, -initial[name].to(tensor.dtype)], dim=1)
    save_file(tensors, str(path), metadata={"format": "pt"})
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # Twice the rank: lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)) must stay what it was.
    factor = math.sqrt(2) if config.get("use_rslora") else 2
    config.update(
        init_lora_weights=True, r=2 * config["r"], lora_alpha=factor * config["lora_alpha"]
    )
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _optimizer(model: Any, cfg: RunConfig) -> torch.optim.Optimizer:
    ratio = cfg.lora.loraplus_lr_ratio
    if ratio is None:
        return adamw(model, cfg)
    # B (and the 1-d weights: biases, DoRA's magnitudes) at ratio x the rate of A, whose
    # gradients are larger (Hayou et al., 2024).
    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=cfg.learning_rate,
        loraplus_lr_ratio=ratio,
        loraplus_weight_decay=cfg.train.weight_decay,
    )


HOOKS = TrainingHooks(optimizer=_optimizer)
