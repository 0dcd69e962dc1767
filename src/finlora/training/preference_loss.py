"""The preference losses on answer log-probabilities, as TRL 1.16 computes them, and the reward
figures validation and eval report.

TRL writes these losses inside its trainers' `_compute_loss` (DPO, KTO), where they cannot be
called without a Trainer, a dataset and an accelerator; so they are written out here over the
same tensors, line for line, and tests/unit/test_preference_loss.py runs TRL's own code (its
`_compute_loss` and `odds_ratio_loss`) on the same log-probabilities and checks the two agree.

Log-probabilities are of the answer tokens only, summed over each answer (`logp`), with the
answer's token count where a loss averages (IPO, ORPO). A reference log-probability is the
run's starting model's: the base model, or the adapter the run started from (`--from`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from finlora.config.preference import PreferenceSection

# ---- DPO (Rafailov et al., 2023) and its variants: one loss per pair ---------------------------


def _sigmoid(delta: torch.Tensor, s: PreferenceSection, _lengths: Any) -> torch.Tensor:
    # With label_smoothing > 0, conservative DPO (cDPO): each label flipped with that chance.
    smoothing = s.label_smoothing
    return (
        -F.logsigmoid(s.beta * delta) * (1 - smoothing) - F.logsigmoid(-s.beta * delta) * smoothing
    )


def _hinge(delta: torch.Tensor, s: PreferenceSection, _lengths: Any) -> torch.Tensor:
    return torch.relu(1 - s.beta * delta)  # SLiC


def _robust(delta: torch.Tensor, s: PreferenceSection, _lengths: Any) -> torch.Tensor:
    smoothing = s.label_smoothing
    clean = -(1 - smoothing) * F.logsigmoid(s.beta * delta)
    flipped = -smoothing * F.logsigmoid(-s.beta * delta)
    return (clean - flipped) / (1 - 2 * smoothing)


DPO_LOSSES: dict[str, Callable[[torch.Tensor, PreferenceSection, Any], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "robust": _robust,
}


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    section: PreferenceSection,
    lengths: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Each pair's DPO loss (N,) from the policy's and the reference's summed answer
    log-probabilities (N,) each; `lengths`: the chosen and rejected answers' token counts."""
    chosen_logratios = chosen - ref_chosen
    rejected_logratios = rejected - ref_rejected
    if section.loss_type == "ipo":
        # IPO (Azar et al., 2023): log-ratios averaged over each answer's tokens, as TRL does
        # (the authors' own normalisation), so tau compares across answer lengths.
        chosen_avg = chosen_logratios / lengths[0].clamp(min=1)
        rejected_avg = rejected_logratios / lengths[1].clamp(min=1)
        return (chosen_avg - rejected_avg - 1 / (2 * section.beta)) ** 2
    delta = chosen_logratios - rejected_logratios
    return DPO_LOSSES[section.loss_type](delta, section, lengths)


# ---- ORPO (Hong et al., 2024): no reference; cross-entropy plus an odds-ratio term --------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (TRL's, after Maechler, 2012)."""
    t = -math.log(2)
    return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_terms(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """log sigmoid of each pair's log odds ratio (N,), from the answers' mean per-token
    log-probabilities; ORPO's loss subtracts its mean, weighted by beta."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return F.logsigmoid(log_odds)


# ---- KTO (Ethayarajh et al., 2024): answers judged one by one, against a KL baseline ------------


def kto_kl(mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """The batch's KL estimate: the mean log-ratio of answers after prompts they do not answer,
    at least 0, with no gradient (the paper's z0)."""
    return (mismatched - ref_mismatched).mean().detach().clamp(min=0)


def kto_losses(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    section: PreferenceSection,
) -> torch.Tensor:
    """Each answer's weighted KTO loss (R,); `desirable` (R,) bool."""
    logratios = logp - ref_logp
    wanted = section.desirable_weight * (1 - torch.sigmoid(section.beta * (logratios - kl)))
    unwanted = section.undesirable_weight * (1 - torch.sigmoid(section.beta * (kl - logratios)))
    return torch.where(desirable, wanted, unwanted)


# ---- what validation and eval report ------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def pair_metrics(
    policy: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    tokens: Sequence[Sequence[int]],
    beta: float,
) -> dict[str, float]:
    """Over pairs (chosen, rejected): the share whose implicit reward beta * (log pi - log
    pi_ref) is higher for the chosen answer, the mean margin between the two rewards, and the
    shares where the policy gives the chosen answer the higher log-probability, summed and per
    token. A tie (the reference against itself) does not count as preferring the chosen."""
    if not policy:
        return {}
    rewards = [
        (beta * (p[0] - r[0]), beta * (p[1] - r[1])) for p, r in zip(policy, reference, strict=True)
    ]
    margins = [c - j for c, j in rewards]
    return {
        "reward_accuracy": _mean([float(m > 0) for m in margins]),
        "reward_margin": _mean(margins),
        "reward_chosen": _mean([c for c, _ in rewards]),
        "reward_rejected": _mean([j for _, j in rewards]),
        "logp_accuracy": _mean([float(p[0] > p[1]) for p in policy]),
        "logp_accuracy_per_token": _mean(
            [float(p[0] / n[0] > p[1] / n[1]) for p, n in zip(policy, tokens, strict=True)]
        ),
    }


def unpaired_metrics(
    policy: Sequence[float],
    reference: Sequence[float],
    desirable: Sequence[bool],
    beta: float,
) -> dict[str, float]:
    """Over single judged answers (KTO records): the share whose implicit reward has the sign
    of its label (positive for a desirable answer, negative otherwise), and the mean reward of
    each kind."""
    if not policy:
        return {}
    rewards = [beta * (p - r) for p, r in zip(policy, reference, strict=True)]
    return {
        "unpaired_reward_accuracy": _mean(
            [float((x > 0) if d else (x < 0)) for x, d in zip(rewards, desirable, strict=True)]
        ),
        "unpaired_reward_desirable": _mean(
            [x for x, d in zip(rewards, desirable, strict=True) if d]
        ),
        "unpaired_reward_undesirable": _mean(
            [x for x, d in zip(rewards, desirable, strict=True) if not d]
        ),
    }
