"""The validation pass of training: loss, perplexity and, for classification, accuracy on the
held-out validation features, and which epoch's adapter is best by them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from finlora.calibration import ece_of, fit_temperature
from finlora.config import SpeedConfig
from finlora.distributed import World
from finlora.models import Placement
from finlora.scoring import prompt_logliks, response_nll
from finlora.tasks.classify import LabelCodec
from finlora.tasks.instruct import InstructCodec


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def _instruct_metrics(
    model: Any,
    codec: InstructCodec,
    features: Sequence[Any],
    speed: SpeedConfig,
    placement: Placement,
    world: World,
) -> dict[str, float]:
    mine = [features[i] for i in world.rows(range(len(features)))]
    nll, count = response_nll(
        model, codec, mine, speed.eval_batch_size, placement.device, placement.dtype,
        speed.label_logits_only,
    )  # fmt: skip
    nll_sum, tokens = world.sum([nll, count], placement.device)
    loss = nll_sum / tokens
    return {"val_loss": loss, "val_perplexity": _perplexity(loss)}


def _label_loglik(
    model: Any,
    codec: LabelCodec,
    features: Sequence[Any],
    speed: SpeedConfig,
    placement: Placement,
    world: World,
) -> np.ndarray:
    """Every label's log-likelihood after each feature's prompt, (N, K) float64, each process
    scoring its share of the rows through the scoring path prediction uses (normalized: the
    validation loss needs the log-likelihoods themselves, not only their softmax)."""
    mine = world.rows(range(len(features)))
    device = placement.device
    scored = prompt_logliks(
        model, codec, [features[i].prompt_ids for i in mine], batch_size=speed.eval_batch_size,
        device=device, dtype=placement.dtype, fast=speed.label_logits_only,
        shared_prompt=speed.shared_prompt_scoring, trim_padding=speed.trim_padding,
    )  # fmt: skip
    loglik = torch.zeros(len(features), len(codec.labels), dtype=torch.float64)
    loglik[mine] = scored
    # Rows another process scored are zero here, so the sum is every process's rows once.
    return world.sum_tensor(loglik.to(device)).cpu().numpy()


@torch.no_grad()
def validate(
    model: Any,
    codec: Any,
    features: Sequence[Any],
    speed: SpeedConfig,
    placement: Placement,
    world: World | None = None,
) -> dict[str, float]:
    """Validation loss (per label or answer token), perplexity and, for classify, accuracy.

    Under several processes each scores its share of the rows and the sums are exchanged, so
    every process gets the same figures. The model is left in training mode.
    """
    if not features:
        return {}
    world = world or World()
    model.eval()
    try:
        if isinstance(codec, InstructCodec):
            return _instruct_metrics(model, codec, features, speed, placement, world)
        assert isinstance(codec, LabelCodec)
        scored = _label_loglik(model, codec, features, speed, placement, world)
    finally:
        model.train()
    gold = np.array([f.label for f in features])
    tokens = sum(len(codec.label_ids[g]) for g in gold)
    loss = float(-scored[np.arange(len(gold)), gold].sum() / tokens)
    # The temperature that would calibrate this epoch's scores: the best epoch's is kept.
    temperature = fit_temperature(scored, gold)
    return {
        "val_loss": loss,
        "val_perplexity": _perplexity(loss),
        "val_accuracy": float((scored.argmax(1) == gold).mean()),
        "val_ece": ece_of(scored, gold),
        "val_temperature": temperature,
        "val_ece_calibrated": ece_of(scored, gold, temperature),
    }


def selection_score(metrics: dict[str, float]) -> float | None:
    """Accuracy first; the loss breaks ties (it is finer-grained on small validation sets).
    Without an accuracy (instruction tuning), the lowest loss wins."""
    if "val_loss" not in metrics:
        return None
    if "val_accuracy" not in metrics:
        return -metrics["val_loss"]
    return metrics["val_accuracy"] - 1e-6 * metrics["val_loss"]
