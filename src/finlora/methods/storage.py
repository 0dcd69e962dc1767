"""How a method's trained weights are written to a run's adapter directory and read back.

PEFT methods save themselves (adapter_model.safetensors + adapter_config.json). Freeze and full
tuning change the model's own weights: they save exactly the tensors that trained, as one
safetensors file, and are rebuilt by applying the method to the base model again and loading
those tensors over it. Either way a small JSON names the method, and nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from finlora.config import RunConfig
from finlora.errors import FinloraError

METHOD_FILE = "finlora_method.json"
TENSORS_FILE = "trainable.safetensors"

Builder = Callable[[Any, RunConfig, str], Any]


def write_method_file(directory: Path, name: str, storage: str) -> None:
    text = json.dumps({"finlora_adapter": 1, "method": name, "storage": storage})
    (directory / METHOD_FILE).write_text(text + "\n", encoding="utf-8")


def read_method_name(directory: Path) -> str | None:
    """The method an adapter directory was saved by; None for runs from before the file."""
    path = directory / METHOD_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["method"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FinloraError(f"{path}: unreadable ({exc})") from None


def save_peft(model: Any, directory: Path) -> None:
    model.save_pretrained(directory)


def load_peft(model: Any, cfg: RunConfig, kind: str, directory: Path, build: Builder) -> Any:
    # PEFT reads adapter_model.safetensors; the base weights come from finlora's own loader.
    # Not trainable: that would also re-run prompt tuning's text initialisation, which needs
    # the base model's tokenizer at the path recorded in adapter_config.json.
    return PeftModel.from_pretrained(model, str(directory), is_trainable=False)


def save_tensors(model: Any, directory: Path) -> None:
    # named_parameters() lists a tied weight once, which safetensors requires.
    tensors = {
        name: p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    save_file(tensors, str(directory / TENSORS_FILE))


def load_tensors(model: Any, cfg: RunConfig, kind: str, directory: Path, build: Builder) -> Any:
    path = directory / TENSORS_FILE
    if not path.is_file():
        raise FinloraError(f"{directory}: no {TENSORS_FILE} (not a {cfg.method.name} run?)")
    # Applying the method again marks the same weights trainable as in training, so that
    # placement (bf16 storage of frozen weights) treats them alike.
    model = build(model, cfg, kind)
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[0]
        raise FinloraError(f"{path}: does not match the model ({odd})")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return model
