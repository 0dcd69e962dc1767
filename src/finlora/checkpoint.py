"""Training checkpoints for --resume, written with safetensors and JSON only (no pickle)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from finlora.atomic import atomic_dir
from finlora.errors import FinloraError


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
) -> None:
    """Write a checkpoint directory atomically (temp dir, then rename)."""
    with atomic_dir(directory) as tmp:
        save_file(_trainable(model), str(tmp / "trainable.safetensors"))
        tensors, groups = _optimizer_tensors(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {
            "progress": asdict(progress),
            "param_groups": groups,
            "scheduler": scheduler.state_dict(),
        }
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = sorted(p for p in checkpoints.glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(
    directory: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any
) -> Progress:
    """Restore model, optimizer, scheduler and RNG state; returns where training stopped."""
    try:
        meta = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(directory / "trainable.safetensors"))
        tensors = load_file(str(directory / "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
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
    return Progress(**meta["progress"])
