"""Where a model runs and in which precision."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from finlora.errors import FinloraError


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


def pick_autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for plain fp32.

    bf16 keeps fp32's exponent range, so no loss scaling is needed; the LoRA weights and the
    optimizer state stay fp32 and only the matrix multiplies run in bf16.
    """
    if precision == "fp32":
        return None
    supported = {
        "cuda": lambda: torch.cuda.is_bf16_supported(),
        "cpu": cpu_has_bf16,
        "mps": lambda: False,
    }[device.type]()
    if precision == "bf16" and not supported:
        raise FinloraError(f"train.precision: bf16 is not supported on {device.type} here")
    return torch.bfloat16 if supported else None


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
