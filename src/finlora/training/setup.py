"""What a run is built from, assembled and checked by the recipe before the run directory
exists: config, prepared data, base model with its tuning method, codec and features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finlora.config import RunConfig
from finlora.data.prepare import PreparedData, PreparedInstruct
from finlora.models import BaseModel, Placement
from finlora.tasks import Codec
from finlora.training.objective import Objective


@dataclass
class Setup:
    """Everything a run needs, built and checked before the first byte is written."""

    cfg: RunConfig
    data: PreparedData | PreparedInstruct
    base: BaseModel
    model: Any  # the base model with the tuning method applied, not yet placed
    codec: Codec
    train: list[Any]  # the codec's features
    validation: list[Any]
    placement: Placement
    load_seconds: float
    objective: Objective  # the loss, validation and first measurements the task trains by
    start: Path | None = None  # the adapter the run starts from (`--from`)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype | None:
        return self.placement.dtype
