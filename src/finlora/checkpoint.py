"""Training checkpoints for --resume, written with safetensors and JSON only (no pickle).

A checkpoint is written whole into a temporary directory, flushed to disk and renamed into
place (`atomic_dir`), so a process killed while writing one (or a disk that fills up) leaves
the previous checkpoint as it was: `latest_checkpoint` only ever sees whole ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from finlora import atomic
from finlora.errors import FinloraError

FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")
# A method's own state beside those (AdaLoRA's importance scores), where it has any.
METHOD_STATE = "method_state.safetensors"


@dataclass
class Progress:
    step: int  # optimizer steps done
    epoch: int  # current epoch, 0-based
    batch_in_epoch: int  # batches of this epoch already consumed
    best_metric: float | None = None
    best_epoch: int | None = None
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    state = optimizer.state_dict()
    tensors = {}
    for idx, slot in state["state"].items():
        for key, value in slot.items():
            tensors[f"{idx}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    return tensors, state["param_groups"]


def save_checkpoint(
    directory: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: Progress,
    method_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint directory atomically (temp dir, then rename); `method_state`, the
    tuning method's own tensors, with it.

    Raises FinloraError naming `directory` when the write fails (a full disk); then nothing
    at `directory` changes.
    """
    with atomic.write_errors(directory), atomic.atomic_dir(directory, durable=True) as tmp:
        save_file(_trainable(model), str(tmp / "trainable.safetensors"))
        atomic.kill_point("checkpoint")
        tensors, groups = _optimizer_tensors(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        if method_state:
            save_file(dict(method_state), str(tmp / METHOD_STATE))
        meta = {
            "progress": asdict(progress),
            "param_groups": groups,
            "scheduler": scheduler.state_dict(),
        }
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest whole checkpoint (`step-NNNNNNN` with all its files), or None.

    A checkpoint being written lives in a temporary directory (`.step-*.tmp`) until it is
    whole, so a write killed mid-way is never taken; neither is an old checkpoint whose
    removal was cut short.
    """
    found = [
        (int(p.name[len("step-") :]), p)
        for p in checkpoints.glob("step-*")
        if p.name[len("step-") :].isdigit() and all((p / f).is_file() for f in FILES)
    ]
    return max(found)[1] if found else None


def load_checkpoint(
    directory: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    load_method_state: Callable[[Any, dict[str, torch.Tensor]], None] | None = None,
) -> Progress:
    """Restore model, optimizer, scheduler and RNG state, and with `load_method_state(model,
    tensors)` the tuning method's own; returns where training stopped."""
    try:
        meta = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(directory / "trainable.safetensors"))
        tensors = load_file(str(directory / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise FinloraError(f"{directory}: unreadable checkpoint ({exc})") from None
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise FinloraError(f"{directory}: checkpoint does not match the model ({missing[0]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    torch.set_rng_state(tensors.pop("rng.torch"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if load_method_state is not None:
        load_method_state(model, _method_state(directory))
    return Progress(**meta["progress"])


def _method_state(directory: Path) -> dict[str, torch.Tensor]:
    """The tuning method's own tensors saved with the checkpoint in `directory` (none: {})."""
    path = directory / METHOD_STATE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise FinloraError(f"{directory}: unreadable checkpoint ({exc})") from None
