"""Tuning methods, one small module each, behind one builder.

Each method names the model kinds it serves and how its trained weights are stored; training,
saving, loading and scoring go through the functions here, never through a method by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from finlora.config import VIRTUAL_TOKEN_METHODS, RunConfig
from finlora.errors import FinloraError
from finlora.methods import (
    adalora,
    adapter,
    freeze,
    full,
    ia3,
    lora,
    prefix,
    prompt,
    ptuning,
    storage,
)
from finlora.methods.hooks import DEFAULT_HOOKS, TrainingHooks
from finlora.models.quantize import dequantized_adapter, is_quantized
from finlora.scoring import is_prompt_learning

Builder = Callable[[Any, RunConfig, str], Any]
Saver = Callable[[Any, Path], None]


@dataclass(frozen=True)
class Method:
    build: Builder  # (model, cfg, kind) -> the model to train, its trainable weights marked
    kinds: tuple[str, ...]  # model kinds it can serve
    storage: str  # "peft" (PEFT's adapter files) or "tensors" (the trained tensors)
    training: TrainingHooks = DEFAULT_HOOKS  # its parts of the training loop
    save: Saver | None = None  # (model, directory) in place of the storage's own save


METHODS: dict[str, Method] = {
    "lora": Method(lora.build, lora.KINDS, "peft", lora.HOOKS, lora.save),
    "prefix": Method(prefix.build, prefix.KINDS, "peft"),
    "prompt": Method(prompt.build, prompt.KINDS, "peft"),
    "ptuning": Method(ptuning.build, ptuning.KINDS, "peft"),
    "ia3": Method(ia3.build, ia3.KINDS, "peft"),
    "freeze": Method(freeze.build, freeze.KINDS, "tensors"),
    "full": Method(full.build, full.KINDS, "tensors"),
    "adalora": Method(adalora.build, adalora.KINDS, "peft", adalora.HOOKS, adalora.save),
    "adapter": Method(adapter.build, adapter.KINDS, "tensors"),
}

_SAVE: dict[str, Saver] = {"peft": storage.save_peft, "tensors": storage.save_tensors}
_LOAD = {"peft": storage.load_peft, "tensors": storage.load_tensors}


def _method(name: str, kind: str) -> Method:
    method = METHODS[name]
    if kind not in method.kinds:
        serving = [n for n, m in METHODS.items() if kind in m.kinds]
        article = "an" if kind[0] in "aeiou" else "a"
        raise FinloraError(
            f"method {name} cannot tune {article} {kind} model (it serves "
            f"{', '.join(method.kinds)}); "
            f"for {kind} models use {', '.join(serving)}"
        )
    return method


def check_method(name: str, kind: str) -> None:
    """Raise FinloraError unless method `name` can tune a model of `kind`."""
    _method(name, kind)


def check_positions(config: Any, cfg: RunConfig) -> None:
    """The text (data.max_length) and any virtual tokens before it must fit the positions
    a model of this transformers `config` has."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return  # relative positions (T5): no fixed limit
    virtual = cfg.method.name in VIRTUAL_TOKEN_METHODS
    n = cfg.method_options.num_virtual_tokens if virtual else 0
    if n + cfg.data.max_length <= limit:
        return
    if virtual:
        raise FinloraError(
            f"{cfg.method.name}.num_virtual_tokens={n} and data.max_length="
            f"{cfg.data.max_length} take {n + cfg.data.max_length} positions; the model has "
            f"{limit}"
        )
    raise FinloraError(f"data.max_length={cfg.data.max_length}: the model has {limit} positions")


def build_method(model: Any, cfg: RunConfig, kind: str) -> Any:
    """Wrap or mark `model` (a transformers model of `kind`) for the configured method.

    Raises FinloraError for a method that cannot serve `kind`, virtual tokens and text that do
    not fit the model's positions, or options the model refuses (e.g. ia3.target_modules
    naming modules it does not have).
    """
    method = _method(cfg.method.name, kind)
    check_positions(getattr(model, "config", None), cfg)
    try:
        return method.build(model, cfg, kind)
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinloraError(f"method {cfg.method.name}: {reason}") from None


def training_hooks(cfg: RunConfig) -> TrainingHooks:
    """The configured method's parts of the training loop (optimizer, per-step work)."""
    return METHODS[cfg.method.name].training


def save_adapter(model: Any, cfg: RunConfig, directory: Path) -> None:
    """Write what the method trained into `directory` (safetensors and JSON only)."""
    method = METHODS[cfg.method.name]
    (method.save or _SAVE[method.storage])(model, directory)
    storage.write_method_file(directory, cfg.method.name, method.storage)


def load_adapter(model: Any, cfg: RunConfig, kind: str, directory: Path) -> Any:
    """The base `model` with the adapter saved in `directory` applied, ready to score."""
    saved = storage.read_method_name(directory) or "lora"
    if saved != cfg.method.name:
        raise FinloraError(
            f"{directory}: adapter was saved by method {saved}, config says {cfg.method.name}"
        )
    method = _method(saved, kind)
    try:
        return _LOAD[method.storage](model, cfg, kind, directory, method.build)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        # A truncated weights file, a malformed adapter_config.json (a list where an object
        # belongs gives TypeError), or a base model that is not the one the adapter was trained
        # on: name the directory, not a library's internals.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinloraError(f"{directory}: cannot load the adapter ({reason[:200]})") from None


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def merged_for_inference(model: Any) -> Any:
    """The model with a LoRA (any variant), AdaLoRA or IA3 adapter folded into its weights
    (PEFT merge_and_unload).

    For prediction only: the merged layers compute W0·x + B·A·x in one matmul instead of three,
    which on a CPU saves the small per-layer operations that dominate after batching. Methods
    with nothing to fold (prefix, prompt, P-tuning, freeze, full) and bottleneck adapters,
    which are not linear, come back unchanged. A quantized base (`model.quantize`) is
    dequantized to fp32 first, and the adapter merged into that.
    """
    if is_prompt_learning(model) or not hasattr(model, "merge_and_unload"):
        return model
    if is_quantized(model):
        # PEFT would merge into the 4-bit weights, rounding the update to 4 bits: fp32 first.
        model = dequantized_adapter(model)
    return model.merge_and_unload()
