"""What every PEFT method config needs to know about the model: its task type and its head."""

from __future__ import annotations

from typing import Any

from peft import TaskType

TASK_TYPES = {
    "causal": TaskType.CAUSAL_LM,
    "seq2seq": TaskType.SEQ_2_SEQ_LM,
    "encoder": TaskType.SEQ_CLS,
}


def head_modules(model: Any) -> list[str]:
    """Names of the modules around the base model that hold weights: a classifier's new head."""
    body = model.base_model
    return [
        name
        for name, module in model.named_children()
        if module is not body and any(True for _ in module.parameters())
    ]


def task_options(model: Any, kind: str) -> dict[str, Any]:
    """PEFT config arguments shared by every method.

    An encoder's classification head starts random, so it trains in full beside the adapter and
    is saved with it (`modules_to_save`): a reloaded run then predicts exactly as before.
    """
    options: dict[str, Any] = {"task_type": TASK_TYPES[kind]}
    if kind == "encoder":
        options["modules_to_save"] = head_modules(model)
    return options
