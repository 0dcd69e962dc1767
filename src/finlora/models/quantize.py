"""Quantized base weights (`model.quantize`): QLoRA (Dettmers et al., 2023) through bitsandbytes.

The frozen base is loaded with its linear layers in 4 bits (NF4 with double quantization:
the blocks' scales are quantized too) or 8 bits (LLM.int8), and a LoRA adapter trains in fp32
over it. Embeddings, norms and the output head stay fp32 (transformers keeps the head out).

What computes with the 4-bit weights is their fp32 dequantization, so the trained function is
exactly W_dq·x + s·B·A·x. Prediction and export that fold the adapter in therefore dequantize
the base first (`dequantized_adapter`) and merge into fp32 weights: the same function, where
PEFT's own merge into a 4-bit layer would round the update back to 4 bits. LLM.int8 scores
with int8 activations too, which no merged weight reproduces: an 8-bit run's merged model is
its dequantized weights plus the update. docs/concepts.md has the figures.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BitsAndBytesConfig

from finlora.errors import FinloraError

# Methods that train beside frozen linear weights without changing them: the quantized base
# serves as it is. Full and freeze train the base weights themselves; the others would need a
# merge path of their own.
QUANTIZABLE_METHODS = ("lora", "adalora")
# Where each mode trains and scores one function. On a CPU, bitsandbytes trains an 8-bit layer
# on its dequantized weight and fp32 activations but scores it (eval mode) with int8 activations:
# SmolLM2's label logits came out up to 5.3 apart, 87% of the labels agreeing (docs/concepts.md),
# so validation would not score the model that trains.
QUANTIZE_DEVICES = {"4bit": ("cpu", "cuda"), "8bit": ("cuda",)}
INSTALL_HINT = "pip install 'finlora[quant]'"


def check_quantize(
    quantize: str | None, method: str, device: str, lora_init: str = "gaussian"
) -> None:
    """Refuse, in one line and before the data or any weight is read, a quantized base where
    it cannot train: another method than LoRA or AdaLoRA, a device where the mode does not
    train and score alike (8bit on a CPU), a LoRA start that rewrites the base weights, or no
    bitsandbytes installed."""
    if quantize is None:
        return
    where = f"model.quantize={quantize}"
    if method not in QUANTIZABLE_METHODS:
        raise FinloraError(
            f"{where}: a quantized base trains {' or '.join(QUANTIZABLE_METHODS)} adapters "
            f"only, not method {method} (set model.quantize=null)"
        )
    devices = QUANTIZE_DEVICES[quantize]
    if device not in devices:
        why = " (it scores 8-bit layers with int8 activations there, not as they train)"
        raise FinloraError(
            f"{where} trains on {' or '.join(devices)}, not {device}"
            f"{why if device == 'cpu' else ''}; 4bit trains on cpu or cuda"
        )
    if lora_init != "gaussian":
        raise FinloraError(
            f"{where}: lora.init={lora_init} moves part of each base weight into A and B, which "
            "a quantized weight cannot give back; use lora.init=gaussian"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FinloraError(f"{where} needs bitsandbytes: {INSTALL_HINT}")


def load_options(quantize: str | None, kind: str) -> dict[str, Any]:
    """from_pretrained arguments that load the linear layers quantized (none for None).
    Raises FinloraError for a model that is no causal LM: an encoder's new head or a
    seq2seq model's kept-fp32 layers would need modules of their own left out."""
    if quantize is None:
        return {}
    if kind != "causal":
        raise FinloraError(
            f"model.quantize={quantize}: causal language models only (this one is {kind})"
        )
    if quantize == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # Quantized on the CPU as it loads; Placement moves the quantized weights where they run.
    return {"quantization_config": config, "device_map": "cpu"}


def is_quantized(model: Any) -> bool:
    """Whether `model` (or the model under a PEFT wrapper) holds bitsandbytes layers."""
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def keep_canonical_layout(model: Any) -> None:
    """Keep every 4-bit weight in bitsandbytes' training layout.

    On a CPU with AVX512-BF16, a 4-bit layer's first forward in eval mode without gradients
    repacks its weight for a bf16 kernel, in place, and later training passes run through
    that kernel, which has no backward: the gradients to the layers below come out wrong
    (torch warns "an autograd kernel was not registered"), from the first validation on. The
    canonical layout computes in fp32 in every mode, so validation scores the trained function.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_for_training(model: Any, quantize: str | None) -> Any:
    """A quantized model through PEFT's preparation for training (fp32 norms and embeddings,
    input embeddings that pass gradients on), without its gradient checkpointing: that is
    `speed.gradient_checkpointing`'s to switch. Any other model comes back as it is."""
    if quantize is None:
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def dequantized(model: Any) -> Any:
    """The quantized transformers `model` as a plain fp32 one: every bitsandbytes layer an
    nn.Linear holding its dequantized weight (what it computed with), the quantization config
    dropped. Raises FinloraError for a model transformers cannot dequantize."""
    try:
        return model.dequantize(dtype=torch.float32)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        raise FinloraError(f"cannot dequantize the base model ({exc})") from None


def dequantized_adapter(peft_model: Any) -> Any:
    """The PEFT `peft_model` rebuilt over its base dequantized to fp32, with the same adapter
    weights: the same function (for 4 bits; an 8-bit run's training function), mergeable in
    fp32. `peft_model` itself is used up (its adapter layers are taken off the base)."""
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    base = dequantized(peft_model.unload())
    # get_peft_model draws starting weights that the saved ones replace at once: keep the
    # caller's random stream as it was.
    with torch.random.fork_rng(devices=[]):
        rebuilt = get_peft_model(base, config, adapter_name=name)
    result: Any = set_peft_model_state_dict(rebuilt, state, adapter_name=name)
    if result.unexpected_keys:
        raise FinloraError(f"cannot rebuild the adapter over the dequantized base ({result})")
    return rebuilt.eval()
