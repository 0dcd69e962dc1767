"""How a method's trained weights are written to a run's adapter directory and read back.

PEFT methods save themselves (adapter_model.safetensors + adapter_config.json). Freeze and full
tuning change the model's own weights: they save exactly the tensors that trained, as one
safetensors file, and are rebuilt by applying the method to the base model again and loading
those tensors over it. Either way a small JSON names the method, and nothing is pickled.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
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
    # PEFT writes module names it holds as a set (target_modules after "all-linear") in the
    # process's string-hash order; sorted, the same run gives the same bytes in every process.
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "feedforward_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_peft(model: Any, cfg: RunConfig, kind: str, directory: Path, build: Builder) -> Any:
    # PEFT reads adapter_model.safetensors; the base weights come from finlora's own loader.
    # Not trainable: that would also re-run prompt tuning's text initialisation, which needs
    # the base model's tokenizer at the path recorded in adapter_config.json.
    with warnings.catch_warnings():
        # PEFT only warns when tensors are missing; _check_landed refuses the adapter instead.
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        # AdaLoRA's saved rank pattern is read as LoRA's per-module ranks too, and named
        # unmatched there; AdaLoRA's own loader applies it.
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not")
        loaded = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    _check_landed(loaded, directory / "adapter_model.safetensors")
    return loaded


def _check_landed(model: Any, path: Path) -> None:
    """Every tensor of the file loaded into the model, and every adapter weight came from it.

    Otherwise the layers PEFT did not fill keep their initial values (LoRA's B is zero: the base
    model, silently) or the file's tensors are dropped.
    """
    if not path.is_file():
        return  # PEFT's own loader has refused it (or read the legacy .bin; we never write one)
    with safe_open(str(path), "pt") as f:
        saved = set(f.keys())
    expected = get_peft_model_state_dict(model)
    _check_names(path, saved, set(expected))
    _check_finite(path, expected)


def _check_names(path: Path, saved: set[str], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing:
        raise FinloraError(f"{path}: does not match the model (no tensor for {missing[0]})")
    if unexpected:
        raise FinloraError(f"{path}: does not match the model (no place for {unexpected[0]})")


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    # A run that diverged before finlora checked each loss could have saved NaN weights, which
    # would predict NaN probabilities for every text.
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FinloraError(f"{path}: {name} holds NaN or infinite values")


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
    _check_names(path, set(tensors), expected)
    _check_finite(path, tensors)
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return model
