"""Where a base model comes from (embedded, local directory, .gguf), and how it is loaded."""

from finlora.models.device import (
    Placement,
    freeze_to_dtype,
    pick_attention,
    pick_autocast_dtype,
    pick_device,
    set_threads,
)
from finlora.models.loading import BaseModel, finlora_home, load_base_model, sha256_file
from finlora.models.registry import DEFAULT_MODEL, EMBEDDED

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "BaseModel",
    "Placement",
    "finlora_home",
    "freeze_to_dtype",
    "pick_attention",
    "load_base_model",
    "pick_autocast_dtype",
    "pick_device",
    "set_threads",
    "sha256_file",
]
