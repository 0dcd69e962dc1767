"""What a method may add to the training loop, each part optional: the loop calls these for
every method and most keep the defaults (AdamW over the trainable weights, nothing else)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from finlora.config import RunConfig


def adamw(model: Any, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable weights at the method's learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.train.weight_decay)


def _nothing(*args: Any) -> None:
    return None


def _no_state(model: Any) -> dict[str, torch.Tensor]:
    return {}


@dataclass(frozen=True)
class TrainingHooks:
    """A method's parts of the training loop."""

    # (model, cfg, the run's optimizer steps): before anything is written, so a FinloraError
    # here is a user mistake like any other.
    prepare: Callable[[Any, RunConfig, int], None] = _nothing
    optimizer: Callable[[Any, RunConfig], torch.optim.Optimizer] = adamw
    # (model) -> a term added to every batch's loss (not to the loss reported), or None.
    penalty: Callable[[Any], torch.Tensor | None] = _nothing
    # (model, the step just taken, 1-based): after the optimizer moved the weights, while the
    # gradients are still there.
    after_update: Callable[[Any, int], None] = _nothing
    # State of the method's own beside the weights and the optimizer's, that a checkpoint
    # keeps for --resume (safetensors: names -> tensors), and how it is put back.
    state: Callable[[Any], dict[str, torch.Tensor]] = _no_state
    load_state: Callable[[Any, dict[str, torch.Tensor]], None] = _nothing


DEFAULT_HOOKS = TrainingHooks()
