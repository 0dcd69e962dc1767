"""What a run trains by: its batch loss, its validation figures, and what it measures before the
first step. Classification and instruction tuning train on the cross-entropy of the label or
answer tokens; a task with an objective of its own (preference: DPO, ORPO, KTO) registers it in
`OBJECTIVES`, and the training loop calls it in their place."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from finlora.config import RunConfig, SpeedConfig
from finlora.distributed import World
from finlora.models import Placement
from finlora.training.preference import PreferenceObjective
from finlora.training.step import accumulate_batch
from finlora.training.validation import validate

Log = Callable[[str], None]


class Objective(Protocol):
    def prepare(
        self, model: Any, train: list[Any], validation: list[Any], placement: Placement, log: Log
    ) -> tuple[list[Any], list[Any]]: ...

    def accumulate(
        self,
        model: Any,
        codec: Any,
        features: list[Any],
        cfg: RunConfig,
        placement: Placement,
        world: World | None = None,
    ) -> tuple[float, int]: ...

    def validate(
        self,
        model: Any,
        codec: Any,
        features: Sequence[Any],
        speed: SpeedConfig,
        placement: Placement,
        world: World | None = None,
    ) -> dict[str, float]: ...

    def epoch_metrics(self, train_loss: float) -> dict[str, float]: ...


class CrossEntropy:
    """Classify and instruct: the mean cross-entropy of the label or answer tokens."""

    def prepare(
        self, model: Any, train: list[Any], validation: list[Any], placement: Placement, log: Log
    ) -> tuple[list[Any], list[Any]]:
        return train, validation  # nothing to measure first

    accumulate = staticmethod(accumulate_batch)
    validate = staticmethod(validate)

    def epoch_metrics(self, train_loss: float) -> dict[str, float]:
        return {"train_loss": train_loss, "train_perplexity": math.exp(min(train_loss, 700.0))}


# task -> its own objective, built from the run's config, codec and prepared data (which it may
# refuse: before anything is written).
OBJECTIVES: dict[str, Callable[[RunConfig, Any, Any], Objective]] = {
    "preference": PreferenceObjective
}


def objective_for(cfg: RunConfig, codec: Any, data: Any) -> Objective:
    """The objective a run of `cfg.task` trains by; raises FinloraError for data it cannot
    train on."""
    factory = OBJECTIVES.get(cfg.task)
    return factory(cfg, codec, data) if factory is not None else CrossEntropy()
