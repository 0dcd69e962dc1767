"""One batch's gradients, the optimizer step, and how many steps a run takes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from finlora import atomic
from finlora.config import RunConfig, TrainConfig
from finlora.distributed import World
from finlora.methods import training_hooks
from finlora.models import Placement
from finlora.scoring import autocast, loss_fn
from finlora.tasks import Codec
from finlora.tasks.classify import token_budget_chunks


def total_steps(examples: int, tc: TrainConfig) -> int:
    """Optimizer steps of a run on `examples` training features: `tc.epochs` epochs of
    `grad_accum` batches a step, capped by `tc.max_steps`."""
    batches_per_epoch = math.ceil(examples / tc.batch_size)
    steps = tc.epochs * math.ceil(batches_per_epoch / tc.grad_accum)
    return min(steps, tc.max_steps) if tc.max_steps else steps


def accumulate_batch(
    model: Any,
    codec: Codec,
    features: list[Any],
    cfg: RunConfig,
    placement: Placement,
    world: World | None = None,
) -> tuple[float, int]:
    """Accumulate one batch's gradients; returns its mean target-token loss and real tokens.

    Targets are the label tokens (classify) or the answer tokens (instruct). The batch runs in
    micro-batches of at most `speed.max_batch_tokens` padded tokens ("auto": by precision). Each
    micro-batch's mean loss is weighted by its share of the batch's target tokens, so the
    summed gradients equal those of the whole batch at once. Under several processes, this
    one takes its rows of the batch (`World.rows`) with the same weights, and the loss and
    tokens returned are the whole batch's; the gradients are summed at the optimizer step
    (`World.sum_gradients`).
    """
    world = world or World()
    total_targets = sum(codec.target_count(f) for f in features)
    features = world.rows(features)
    label_tokens = [codec.target_count(f) for f in features]
    widths = [codec.width(f) for f in features]
    loss_sum, real = 0.0, 0
    # Not cut further to trim padding (as scoring is): batches are already grouped by length,
    # and a training pass has so many operators (backward included) that two more passes cost
    # more than the ~10% of padding they would save, measured on fp32 and bf16 CPUs.
    # A process may have no rows of a short last batch: then no chunk, and zeros to the sum.
    for chunk in token_budget_chunks(widths, placement.batch_tokens(cfg.speed.max_batch_tokens)):
        batch = codec.training_batch([features[i] for i in chunk]).to(placement.device)
        share = sum(label_tokens[i] for i in chunk) / total_targets
        with autocast(placement.device, placement.dtype):
            loss = loss_fn(model, batch, codec.kind, cfg.speed.label_logits_only) * share
        backward(model, cfg, loss, share)
        loss_sum += loss.item()
        real += batch.real_tokens
    loss_sum, whole = world.sum([loss_sum, real], placement.device)
    return loss_sum, int(whole)


def backward(model: Any, cfg: RunConfig, loss: torch.Tensor, share: float) -> None:
    """Backward of a micro-batch's `loss` (its `share` of the batch already in it), with the
    method's penalty (AdaLoRA's) at the same share: trained with, but not reported in, the loss."""
    penalty = training_hooks(cfg).penalty(model)
    objective = loss if penalty is None else loss + penalty * share
    (objective / cfg.train.grad_accum).backward()


def optimizer_step(
    model: Any,
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float,
    world: World,
    after_update: Callable[[], None] | None = None,
) -> None:
    """Sum the accumulated gradients of `params` over the processes, clip the model's to
    `max_grad_norm`, step the optimizer and the learning-rate schedule, clear the gradients.
    `after_update` runs once the weights moved, while the gradients are still there (a
    method's own step: AdaLoRA's rank allocation)."""
    world.sum_gradients(params)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if after_update is not None:
        after_update()
    atomic.kill_point("step")  # the weights moved, the schedule not yet: the crash test's mid-step
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
