"""Where a model runs and in which precision."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finlora.config import SpeedConfig, TrainConfig
from finlora.errors import FinloraError
from finlora.models.fast.fused_decoder import fused_decoders
from finlora.models.fast.fused_lora import fuse_lora_layers
from finlora.models.fast.lean_attention import lean_attention
from finlora.models.fast.lean_mlp import lean_mlps
from finlora.models.fast.norm_cast import cast_norms_once


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes cuda, then mps, then cpu; an explicit device that is absent is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available.get(requested, False):
        raise FinloraError(f"train.device: {requested} is not available on this machine")
    return torch.device(requested)


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# `precision: auto` takes bf16 on a CPU only where its matmuls beat fp32's by this much. bf16
# instructions alone do not promise it: on 2 cores of one Xeon, bf16 ran 5.8x fp32 with AMX and
# 0.59x with AMX kept off (AVX512-BF16 kernels against an AVX512 fp32 path).
BF16_MIN_SPEEDUP = 1.3


@functools.cache
def cpu_bf16_speedup(threads: int, rows: int = 512) -> float:
    """How many times faster a bf16 matmul runs than an fp32 one here, at `threads` threads, on
    a (rows x 576) @ (576 x 1536) product (an MLP projection of a small model); ~0.1 s."""
    del threads  # part of the cache key: the rate depends on the thread count
    a, b = torch.randn(rows, 576), torch.randn(576, 1536)

    def seconds(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # first call: kernel selection (oneDNN compiles one per shape)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(a, b) / seconds(a.bfloat16(), b.bfloat16())


def _cpu_bf16(precision: str) -> bool:
    """bf16 autocast on this CPU: where asked and supported; under auto, only where it pays."""
    if not cpu_has_bf16():
        return False  # emulated bf16 is ~100x slower than fp32: never worth probing
    return precision == "bf16" or cpu_bf16_speedup(torch.get_num_threads()) >= BF16_MIN_SPEEDUP


def pick_autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for plain fp32.

    bf16 keeps fp32's exponent range, so no loss scaling is needed; the LoRA weights and the
    optimizer state stay fp32 and only the matrix multiplies run in bf16. On a CPU, `auto`
    times both precisions once (`cpu_bf16_speedup`) and takes bf16 only where it is faster.
    """
    if precision == "fp32":
        return None
    checks: dict[str, Callable[[], bool]] = {
        "cuda": torch.cuda.is_bf16_supported,
        "cpu": lambda: _cpu_bf16(precision),
        "mps": lambda: False,
    }
    supported = checks[device.type]()
    if precision == "bf16" and not supported:
        raise FinloraError(f"train.precision: bf16 is not supported on {device.type} here")
    return torch.bfloat16 if supported else None


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def pick_attention(device: torch.device, requested: str = "auto") -> str:
    """Attention kernel: eager on the CPU (faster for short sequences), SDPA elsewhere."""
    if requested != "auto":
        return requested
    return "eager" if device.type == "cpu" else "sdpa"


def _output_head(model: torch.nn.Module) -> Any:
    """The model's output head module (a PEFT wrapper passes the call through), or None."""
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def freeze_to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store frozen nn.Linear weights in `dtype`; returns how many were cast.

    Meant for bf16 autocast, which would cast these weights at every use anyway: the matmuls
    compute the same numbers, the casts disappear and the weights take half the memory.
    Embeddings, norms and the (often tied) output head stay fp32.
    """
    head = _output_head(model)
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            weight = module.weight
            # A quantized layer's weight (bitsandbytes) is integer codes: left as it is.
            if not weight.requires_grad and weight.is_floating_point() and weight.dtype != dtype:
                weight.data = weight.data.to(dtype)
                count += 1
    return count


def head_to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Give a frozen linear output head its own weight in `dtype`; True if it got one.

    A head tied to the input embeddings is untied: the embeddings stay fp32 and the head holds
    a `dtype` copy (57 MB for SmolLM2 in bf16). Autocast would cast the fp32 weight to the same
    values at every call: a 49,152 x 576 matrix, ~34 ms on 2 cores, every scoring pass and every
    generated token, more than the head's own matmul at a few label positions. Same numbers.
    """
    head = _output_head(model)
    if not isinstance(head, torch.nn.Linear):
        return False
    weight = head.weight
    if weight.requires_grad or weight.dtype == dtype:
        return False
    head.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    config: Any = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        # Say so: a later tie_weights() would undo the copy, and PEFT's merge warned at every
        # prediction that the tied head had come untied.
        config.tie_word_embeddings = False
    return True


def release_checkpoint_pages(model: torch.nn.Module) -> None:
    """Copy the fp32 tensors left after the bf16 casts (embeddings, norms, buffers) out of the
    checkpoint file's memory map, so the map can close.

    safetensors maps the whole file and every loaded tensor is a view into it: while one view
    lives, every page the casts read stays in the process's resident memory. For SmolLM2 that
    was the 0.54 GB fp32 file next to its bf16 copy; the copies made here cost 0.11 GB.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype == torch.float32 and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()


def set_gradient_checkpointing(model: Any, on: bool, every_n_layers: int = 1) -> None:
    """Turn transformers' activation checkpointing on for a (PEFT-wrapped) model, for every
    `every_n_layers`-th layer.

    Non-reentrant checkpointing: it needs no gradient on the inputs, so it works with frozen
    embeddings (LoRA) and with the decoder stack called directly (the fast path).
    """
    if not on:
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise FinloraError(
            "speed.gradient_checkpointing_every > 1 needs a transformers release with "
            "activation_checkpointing_enable"
        )


def compile_layers(model: Any) -> int:
    """torch.compile every decoder layer in place (dynamic shapes); returns how many.

    Per layer rather than the whole model: the layers are identical, so one graph serves them
    all, and compiling took 75 s instead of 15 minutes for the whole decoder (measured on a
    2-core CPU). Without a decoder layer stack there is nothing to compile: an error.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(inner, "get_decoder", None)
    layers = getattr(get_decoder() if callable(get_decoder) else None, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise FinloraError("speed.compile: this model has no decoder layer stack to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


# `speed.max_batch_tokens: auto`, by autocast dtype: what keeps the FPB recipe under 2.5 GB
# (SpeedConfig.max_batch_tokens says how it was measured).
AUTO_BATCH_TOKENS = {None: 448, torch.bfloat16: 512}


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs: device, autocast dtype, attention kernel, weight storage,
    LoRA layer, MLP, attention and decoder-layer forwards, compiled layers."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None means plain fp32
    attention: str
    bf16_frozen_weights: bool = True
    bf16_head: bool = True
    fused_lora: bool = True
    compile: bool = False
    lean_mlp: bool = True
    cast_norms_once: bool = False
    lean_attention: bool = True
    fused_decoder: bool = True

    @classmethod
    def from_config(cls, tc: TrainConfig, speed: SpeedConfig) -> Placement:
        """Resolve the "auto" settings of `tc` and `speed` for this machine.

        Raises FinloraError for a device or precision this machine lacks.
        """
        set_threads(speed.threads)
        device = pick_device(tc.device)
        return cls(
            device,
            pick_autocast_dtype(device, tc.precision),
            pick_attention(device, speed.attention),
            speed.bf16_frozen_weights,
            speed.bf16_head,
            speed.fused_lora,
            speed.compile,
            speed.lean_mlp,
            speed.cast_norms_once,
            speed.lean_attention,
            speed.fused_decoder,
        )

    def batch_tokens(self, requested: int | str | None) -> int | None:
        """Padded tokens per training pass: `speed.max_batch_tokens`, with "auto" resolved for
        this placement's precision."""
        if requested == "auto":
            return AUTO_BATCH_TOKENS.get(self.dtype, AUTO_BATCH_TOKENS[None])
        assert not isinstance(requested, str)  # validated in SpeedConfig
        return requested

    def place(self, model: Any) -> Any:
        """Move a (wrapped) model to the device; store frozen weights and the output head in
        bf16 where it pays; give LoRA layers, gated MLPs, attention and decoder layers their
        leaner forwards, norms their single cast, and compile layers when asked."""
        model = model.to(self.device)
        if self.dtype == torch.bfloat16 and self.bf16_frozen_weights:
            freeze_to_dtype(model, torch.bfloat16)
        if self.dtype == torch.bfloat16 and self.bf16_head:
            head_to_dtype(model, torch.bfloat16)
        if self.dtype == torch.bfloat16 and self.bf16_frozen_weights:
            release_checkpoint_pages(model)
        if self.fused_lora:
            fuse_lora_layers(model)
        if self.lean_mlp:
            lean_mlps(model)
        if self.lean_attention:
            lean_attention(model)
        if self.dtype is not None and self.cast_norms_once:
            cast_norms_once(model)
        if self.fused_decoder and not self.compile:
            fused_decoders(model)
        if self.compile:
            compile_layers(model)
        return model
