"""The `preference:` section: the objective of a preference run (task preference) and its options.

The option names are TRL's (DPOConfig, ORPOConfig, KTOConfig), so a setting reads the same in
both; the losses themselves are computed in `finlora.training.preference_loss`, as TRL 1.16 does.
"""

from __future__ import annotations

from dataclasses import dataclass

from finlora.config.fields import check_choice, fail, opt

OBJECTIVES = ("dpo", "orpo", "kto")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
# Objectives that learn from pairs: a record must hold a chosen and a rejected answer.
PAIRED_OBJECTIVES = ("dpo", "orpo")
# Objectives that compare the policy with a frozen reference model (the run's starting model).
REFERENCE_OBJECTIVES = ("dpo", "kto")


@dataclass
class PreferenceSection:
    """Preference tuning (task preference): which objective, and how strongly it pulls."""

    objective: str = opt(
        "dpo",
        "dpo (Rafailov et al., 2023): pairs, the policy against a frozen reference model (the "
        "run's starting model); orpo (Hong et al., 2024): pairs, no reference, the chosen "
        "answer's cross-entropy plus an odds-ratio term; kto (Ethayarajh et al., 2024): "
        "answers marked desirable or not (a pair counts as one of each), against the reference.",
    )
    beta: float = opt(
        0.1,
        "dpo, kto: how far the policy may move from the reference (higher: less; for "
        "loss_type ipo the regularisation tau); orpo: the weight (lambda) of the odds-ratio "
        "term. Also the scale of the implicit rewards eval reports.",
    )
    loss_type: str = opt(
        "sigmoid",
        "dpo: sigmoid (the paper's), hinge (SLiC), ipo (Azar et al., 2023; log-ratios averaged "
        "over the answer tokens), robust (Chowdhury et al., 2024; label_smoothing is the "
        "chance a pair's preference is flipped).",
    )
    label_smoothing: float = opt(
        0.0,
        "dpo, loss_type sigmoid (conservative DPO) or robust: the assumed chance that a pair's "
        "preference is flipped (0 <= x < 0.5).",
    )
    desirable_weight: float = opt(1.0, "kto: the weight of the desirable answers' loss.")
    undesirable_weight: float = opt(1.0, "kto: the weight of the undesirable answers' loss.")

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.objective", self.objective, OBJECTIVES)
        if not self.beta > 0:
            fail(f"{prefix}.beta", f"must be positive (got {self.beta})")
        check_choice(f"{prefix}.loss_type", self.loss_type, DPO_LOSS_TYPES)
        if not 0 <= self.label_smoothing < 0.5:
            fail(f"{prefix}.label_smoothing", f"must be in [0, 0.5) (got {self.label_smoothing})")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                fail(f"{prefix}.{name}", f"must be positive (got {getattr(self, name)})")
        self._check_applies(prefix)

    def _check_applies(self, prefix: str) -> None:
        """Refuse an option the chosen objective would not read: it would do nothing."""
        default = PreferenceSection()
        own = {
            "loss_type": "dpo",
            "label_smoothing": "dpo",
            "desirable_weight": "kto",
            "undesirable_weight": "kto",
        }
        for name, objective in own.items():
            if getattr(self, name) != getattr(default, name) and self.objective != objective:
                fail(
                    f"{prefix}.{name}",
                    f"is an option of objective {objective}, but {prefix}.objective is "
                    f"{self.objective}",
                )
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            fail(
                f"{prefix}.label_smoothing",
                f"applies to loss_type sigmoid or robust (loss_type is {self.loss_type})",
            )
