"""AdaLoRA (Zhang et al., 2023) through PEFT: each update in SVD form, s · P·diag(Λ)·Q · x / r,
with a budget of singular values that falls from `init_r` to `target_r` per weight on average
over the run, kept where the importance scores (|w · ∂L/∂w|, smoothed) are highest.

Λ starts at zero, so the adapted model begins exactly as the base model. The budget follows
the run's optimizer steps: `tinit` and `tfinal` are shares of them, fixed once the data says how
many there are (`prepare`). After every optimizer step PEFT's `update_and_allocate` scores the
weights and masks the singular values past the budget (`after_update`); the penalty that keeps
P and Q orthogonal is added to the loss (`penalty`). A saved adapter holds the ranks kept.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig, get_peft_model

from finlora.config import RunConfig
from finlora.errors import FinloraError
from finlora.methods import storage
from finlora.methods.hooks import TrainingHooks
from finlora.methods.peft_task import task_options

KINDS = ("causal", "seq2seq", "encoder")


def build(model: Any, cfg: RunConfig, kind: str) -> Any:
    section = cfg.adalora
    peft_config = AdaLoraConfig(
        init_r=section.init_r,
        target_r=section.target_r,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=section.target_modules,
        deltaT=section.deltaT,
        beta1=section.beta1,
        beta2=section.beta2,
        orth_reg_weight=section.orth_reg_weight,
        # The schedule in steps is set by `prepare` once the run's step count is known; PEFT
        # wants a valid one now.
        tinit=0,
        tfinal=0,
        total_step=1,
        **task_options(model, kind),
    )
    return get_peft_model(model, peft_config)


def schedule(cfg: RunConfig, steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in steps for a run of `steps` optimizer steps.

    Raises FinloraError when they leave the budget no step to fall in.
    """
    section = cfg.adalora
    tinit, tfinal = round(section.tinit * steps), round(section.tfinal * steps)
    # The final allocation ranks the weights by scores gathered in the steps before it.
    if tinit >= steps - tfinal or steps - tfinal < 2:
        raise FinloraError(
            f"adalora: a run of {steps} optimizer steps leaves no step between tinit "
            f"({tinit} steps) and tfinal ({tfinal}) for the rank budget to fall; lower "
            "adalora.tinit or adalora.tfinal, or train longer"
        )
    return tinit, tfinal


def _prepare(model: Any, cfg: RunConfig, steps: int) -> None:
    config = model.peft_config["default"]
    config.tinit, config.tfinal = schedule(cfg, steps)
    config.total_step = steps  # the rank allocator reads this same config


def save(model: Any, directory: Path) -> None:
    """PEFT's adapter files, the ranks kept in them."""
    with warnings.catch_warnings():
        # A weight whose every singular value the budget took is saved at rank 0, which PEFT
        # takes for an unsharded tensor of a distributed save and warns about.
        warnings.filterwarnings("ignore", message=".* LoRA tensor\\(s\\) have invalid shape")
        storage.save_peft(model, directory)


def _after_update(model: Any, step: int) -> None:
    model.base_model.update_and_allocate(step)


def _orthogonal_penalty(model: Any) -> torch.Tensor | None:
    """orth_reg_weight · the mean of ‖P·Pᵀ - I‖_F and ‖Qᵀ·Q - I‖_F over the adapted weights.

    PEFT adds this in AdaLoraModel.forward, but only to a loss the model computes from labels,
    and finlora computes its loss from the logits.
    """
    weight = model.peft_config["default"].orth_reg_weight
    if weight == 0:
        return None
    terms = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." in name:
            cov = p @ p.T  # (r, r)
        elif ".lora_B." in name:
            cov = p.T @ p  # (r, r)
        else:
            continue
        eye = torch.eye(cov.size(0), dtype=cov.dtype, device=cov.device)
        terms.append(torch.linalg.matrix_norm(cov - eye))
    return weight * torch.stack(terms).mean() if terms else None


# The allocator's smoothed scores and the rank pattern live outside the weights; a checkpoint
# keeps them so that a resumed run allocates as the uninterrupted one would.
_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def _state(model: Any) -> dict[str, torch.Tensor]:
    allocator = model.base_model.rankallocator
    state = {
        f"{kind}/{name}": tensor.detach().cpu().contiguous()
        for kind in _SCORES
        for name, tensor in getattr(allocator, kind).items()
    }
    pattern = model.peft_config["default"].rank_pattern or {}
    for name, kept in pattern.items():
        state[f"rank_pattern/{name}"] = torch.as_tensor(kept, dtype=torch.bool).reshape(-1)
    return state


def _load_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    allocator = model.base_model.rankallocator
    params = dict(model.base_model.model.named_parameters())  # the allocator's names
    pattern: dict[str, list[bool]] = {}
    for key, tensor in state.items():
        kind, name = key.split("/", 1)
        if kind == "rank_pattern":
            pattern[name] = tensor.tolist()
        else:
            getattr(allocator, kind)[name] = tensor.to(params[name].device)
    model.peft_config["default"].rank_pattern = pattern or None


HOOKS = TrainingHooks(
    prepare=_prepare,
    penalty=_orthogonal_penalty,
    after_update=_after_update,
    state=_state,
    load_state=_load_state,
)
