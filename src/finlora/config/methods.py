"""The tuning method, and one section of options per method (lora, prefix, prompt, ...)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from finlora.config.fields import (
    check_choice,
    check_fraction,
    check_learning_rate,
    check_positive,
    fail,
    opt,
)

# Every method section has `learning_rate`: null means train.learning_rate. The methods differ
# by orders of magnitude in the rate they train well at (a handful of prompt vectors against
# every weight of the model), so the non-LoRA sections carry the rate their papers and the
# PEFT examples use; LoRA keeps train.learning_rate, which the FPB recipe is tuned for.


def _rate(default: float | None) -> Any:
    return opt(default, "This method's learning rate; null: train.learning_rate.")


LORA_BIASES = ("none", "all", "lora_only")
LORA_INITS = ("gaussian", "pissa", "olora")


@dataclass
class LoraSection:
    """LoRA (Hu et al., 2021): a trained low-rank update B·A beside each adapted weight."""

    r: int = opt(16, "Rank of the update: the inner size of lora_A and lora_B.")
    lora_alpha: int = opt(32, "The update is scaled by lora_alpha / r.")
    lora_dropout: float = opt(
        0.0,
        "Dropout on the adapted layers' input (0 <= x < 1). Off by default: on a CPU the masks "
        "cost about a quarter of a step, and an epoch or two of LoRA hardly overfits.",
    )
    target_modules: list[str] | str = opt(
        "all-linear", "Module names to adapt, or all-linear: every linear layer but the head."
    )
    bias: str = opt("none", "Biases that train: none, all, or lora_only (the adapted layers').")
    use_dora: bool = opt(
        False,
        "DoRA (Liu et al., 2024): the adapted weight split into a trained magnitude per output "
        "and a direction that LoRA updates. Takes PEFT's own layers, not the fused ones.",
    )
    use_rslora: bool = opt(
        False, "rsLoRA (Kalajdzievski, 2023): scale the update by lora_alpha / sqrt(r), not / r."
    )
    init: str = opt(
        "gaussian",
        "How A and B start. gaussian: A random, B zero (the base model exactly); pissa (Meng et "
        "al., 2024): the top r singular directions of each weight; olora (Büyükakyüz, 2024): its "
        "QR factors. pissa and olora move that part of the base weight into A and B; the saved "
        "adapter is turned back into a plain LoRA of rank 2r on the untouched base weights.",
    )
    loraplus_lr_ratio: float | None = opt(
        None,
        "LoRA+ (Hayou et al., 2024): lora_B (and 1-d weights) train at this many times the "
        "learning rate of lora_A, through PEFT's LoRA+ optimizer; e.g. 16. null: one rate.",
    )
    learning_rate: float | None = _rate(None)

    # Options that make another method of the same family: `finlora compare` names its rows
    # by them (lora[use_dora=true]) when they differ from these defaults.
    VARIANTS: ClassVar[tuple[str, ...]] = ("use_dora", "use_rslora", "init", "loraplus_lr_ratio")

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.r", self.r)
        if self.lora_alpha <= 0:
            fail(f"{prefix}.lora_alpha", f"must be positive (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            fail(f"{prefix}.lora_dropout", f"must be in [0, 1) (got {self.lora_dropout})")
        check_choice(f"{prefix}.bias", self.bias, LORA_BIASES)
        check_target_modules(f"{prefix}.target_modules", self.target_modules)
        check_choice(f"{prefix}.init", self.init, LORA_INITS)
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio < 1:
            fail(
                f"{prefix}.loraplus_lr_ratio",
                f"must be at least 1 or null (got {self.loraplus_lr_ratio})",
            )
        check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


@dataclass
class PrefixSection:
    """Prefix tuning (Li & Liang, 2021): trained key/value vectors before every layer."""

    num_virtual_tokens: int = opt(20, "Trained prefix positions per layer.")
    prefix_projection: bool = opt(
        False, "Produce the prefix through a 2-layer MLP (the paper's trick for stable training)."
    )
    encoder_hidden_size: int = opt(512, "Width of that MLP (with prefix_projection only).")
    learning_rate: float | None = _rate(1e-2)

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.num_virtual_tokens", self.num_virtual_tokens)
        check_positive(f"{prefix}.encoder_hidden_size", self.encoder_hidden_size)
        check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


PROMPT_INITS = ("text", "random")
PROMPT_INIT_TEXTS = {
    "classify": "Classify the sentiment of this financial news as negative, neutral or positive:",
    "instruct": "Answer the following financial question or task accurately and concisely:",
    "preference": "Answer the following financial question or task accurately and concisely:",
}


@dataclass
class PromptSection:
    """Prompt tuning (Lester et al., 2021): trained input embeddings before the prompt."""

    num_virtual_tokens: int = opt(20, "Trained embeddings put before the prompt.")
    init: str = opt(
        "text",
        "text: start them at the embeddings of init_text (repeated to fill them), which trains "
        "far better on small models; random: random vectors.",
    )
    init_text: str | None = opt(
        None,
        "The text for init text. null: one for the run's task, so an instruct run does not "
        "start from a sentiment cue.",
    )
    learning_rate: float | None = _rate(3e-2)

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.num_virtual_tokens", self.num_virtual_tokens)
        check_choice(f"{prefix}.init", self.init, PROMPT_INITS)
        if self.init == "text" and self.init_text is not None and not self.init_text.strip():
            fail(f"{prefix}.init_text", "must not be empty when prompt.init is text")
        check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


PTUNING_ENCODERS = ("MLP", "LSTM")


@dataclass
class PTuningSection:
    """P-tuning (Liu et al., 2021): virtual token embeddings produced by a small prompt encoder."""

    num_virtual_tokens: int = opt(20, "Virtual tokens put before the prompt.")
    encoder_hidden_size: int = opt(128, "Width of the prompt encoder.")
    encoder_reparameterization_type: str = opt("MLP", "The prompt encoder: MLP or LSTM.")
    learning_rate: float | None = _rate(1e-3)

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.num_virtual_tokens", self.num_virtual_tokens)
        check_positive(f"{prefix}.encoder_hidden_size", self.encoder_hidden_size)
        check_choice(
            f"{prefix}.encoder_reparameterization_type",
            self.encoder_reparameterization_type,
            PTUNING_ENCODERS,
        )
        check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


@dataclass
class IA3Section:
    """(IA)^3 (Liu et al., 2022): learned vectors that rescale keys, values and FFN activations."""

    target_modules: list[str] | None = opt(
        None,
        "Modules to rescale. null: PEFT's choice for the architecture (Llama: k_proj, v_proj, "
        "down_proj; T5: k, v, wo).",
    )
    feedforward_modules: list[str] | None = opt(
        None,
        "The target_modules that are feed-forward layers, scaled on their input (needs "
        "target_modules). null: PEFT's choice.",
    )
    learning_rate: float | None = _rate(3e-3)

    def validate(self, prefix: str) -> None:
        if self.target_modules is not None and not self.target_modules:
            fail(f"{prefix}.target_modules", "must name at least one module or be null")
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                fail(f"{prefix}.feedforward_modules", "needs ia3.target_modules set as well")
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                fail(
                    f"{prefix}.feedforward_modules",
                    f"must be a subset of ia3.target_modules ({extra[0]!r} is not)",
                )
        check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


@dataclass
class FreezeSection:
    """Freeze tuning: train only the top `layers` transformer blocks (and what follows them)."""

    layers: int = opt(2, "Transformer blocks that train, counted from the top.")
    learning_rate: float | None = _rate(1e-4)

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.layers", self.layers)
        check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


@dataclass
class FullSection:
    """Full fine-tuning: every weight trains."""

    learning_rate: float | None = _rate(5e-5)

    def validate(self, prefix: str) -> None:
        check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


@dataclass
class AdaLoraSection:
    """AdaLoRA (Zhang et al., 2023): LoRA in SVD form whose rank budget moves to where it counts."""

    init_r: int = opt(12, "Rank each adapted weight starts with.")
    target_r: int = opt(8, "Average rank left per adapted weight once the budget has fallen.")
    lora_alpha: int = opt(32, "The update is scaled by lora_alpha / the rank.")
    lora_dropout: float = opt(0.0, "Dropout on the adapted layers' input (0 <= x < 1).")
    target_modules: list[str] | str = opt(
        "all-linear", "Module names to adapt, or all-linear: every linear layer but the head."
    )
    tinit: float = opt(
        0.1,
        "Share of the run's steps trained at init_r before the budget starts to fall (the "
        "paper's t_i, as a share: the step count comes from the data).",
    )
    tfinal: float = opt(
        0.2, "Share of the run's steps trained at the final ranks (the paper's t_f, as a share)."
    )
    deltaT: int = opt(1, "Steps between two reallocations of the budget.")
    beta1: float = opt(0.85, "Smoothing of the importance scores (EMA, 0 < x < 1).")
    beta2: float = opt(0.85, "Smoothing of their uncertainty (EMA, 0 < x < 1).")
    orth_reg_weight: float = opt(
        0.5, "Weight of the penalty that keeps P and Q orthogonal, added to the training loss."
    )
    # Its SVD form starts E at zero between small P and Q, so its updates start far smaller
    # than LoRA's: at LoRA's 3e-4, 40 FPB steps left validation accuracy at the base model's
    # 0.14; at 2e-3 it reached 0.84 (LoRA: 0.88).
    learning_rate: float | None = _rate(2e-3)

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.init_r", self.init_r)
        check_positive(f"{prefix}.target_r", self.target_r)
        if self.target_r >= self.init_r:
            # Equal ranks leave no budget to reallocate (and PEFT's allocator cannot rank 0 items).
            fail(
                f"{prefix}.target_r",
                f"must be below adalora.init_r={self.init_r} (got {self.target_r})",
            )
        if self.lora_alpha <= 0:
            fail(f"{prefix}.lora_alpha", f"must be positive (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            fail(f"{prefix}.lora_dropout", f"must be in [0, 1) (got {self.lora_dropout})")
        check_target_modules(f"{prefix}.target_modules", self.target_modules)
        for key in ("tinit", "tfinal"):
            check_fraction(f"{prefix}.{key}", getattr(self, key), allow_zero=True)
        if self.tinit + self.tfinal >= 1:
            fail(
                f"{prefix}.tinit",
                f"+ tfinal must be below 1, to leave steps for the budget to fall (got "
                f"{self.tinit} + {self.tfinal})",
            )
        check_positive(f"{prefix}.deltaT", self.deltaT)
        for key in ("beta1", "beta2"):
            check_fraction(f"{prefix}.{key}", getattr(self, key), allow_zero=False)
        if self.orth_reg_weight < 0:
            fail(f"{prefix}.orth_reg_weight", f"must be >= 0 (got {self.orth_reg_weight})")
        check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


ADAPTER_PLACEMENTS = ("houlsby", "pfeiffer")
ADAPTER_NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclass
class AdapterSection:
    """Bottleneck adapters (Houlsby et al., 2019): h + up(f(down(h))) on a block's sublayers."""

    placement: str = opt(
        "houlsby",
        "houlsby: an adapter after each layer's attention and one after its feed-forward part; "
        "pfeiffer (Pfeiffer et al., 2021): after the feed-forward part only.",
    )
    reduction_factor: int = opt(
        16, "Hidden size / bottleneck size (at least 1 unit wide whatever the model)."
    )
    non_linearity: str = opt("relu", "f between down and up: relu, gelu, silu or tanh.")
    learning_rate: float | None = _rate(1e-4)

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.placement", self.placement, ADAPTER_PLACEMENTS)
        check_positive(f"{prefix}.reduction_factor", self.reduction_factor)
        check_choice(f"{prefix}.non_linearity", self.non_linearity, ADAPTER_NON_LINEARITIES)
        check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


# Methods that put trained virtual tokens before the text: they take positions of the model's
# own, and every record of a sequence would have to read them.
VIRTUAL_TOKEN_METHODS = ("prefix", "prompt", "ptuning")

# Method name -> its section of options; the section has the method's name in the config.
METHOD_SECTIONS: dict[str, type] = {
    "lora": LoraSection,
    "prefix": PrefixSection,
    "prompt": PromptSection,
    "ptuning": PTuningSection,
    "ia3": IA3Section,
    "freeze": FreezeSection,
    "full": FullSection,
    "adalora": AdaLoraSection,
    "adapter": AdapterSection,
}


@dataclass
class MethodConfig:
    """The tuning method; its options are in the section of the same name."""

    name: str = opt("lora", "lora, prefix, prompt, ptuning, ia3, freeze, full, adalora or adapter.")

    start_from: str | None = opt(
        None,
        "A finished run whose trained adapter this run starts from and trains further "
        "(`finlora train --from RUN`): the same base model, method and method options. A "
        "preference run's reference model is then that adapter as trained. null: a new "
        "adapter.",
    )

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.name", self.name, tuple(METHOD_SECTIONS))
        if self.start_from is not None and not self.start_from.strip():
            fail(f"{prefix}.start_from", "must name a run directory or be null")


def check_target_modules(key: str, value: list[str] | str) -> None:
    """A list of module names, or one string that PEFT matches against every module's full
    name as a regular expression ("all-linear" aside): it must compile."""
    if isinstance(value, list) and not value:
        fail(key, "must name at least one module or be 'all-linear'")
    if isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as exc:
            fail(key, f"is not a valid regular expression, which PEFT reads a string as ({exc})")
