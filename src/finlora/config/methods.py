"""The tuning method, and one section of options per method (lora, prefix, prompt, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finlora.config.fields import check_choice, check_learning_rate, check_positive, fail, opt

# Every method section has `learning_rate`: null means train.learning_rate. The methods differ
# by orders of magnitude in the rate they train well at (a handful of prompt vectors against
# every weight of the model), so the non-LoRA sections carry the rate their papers and the
# PEFT examples use; LoRA keeps train.learning_rate, which the FPB recipe is tuned for.


def _rate(default: float | None) -> Any:
    return opt(default, "This method's learning rate; null: train.learning_rate.")


LORA_BIASES = ("none", "all", "lora_only")


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
    learning_rate: float | None = _rate(None)

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.r", self.r)
        if self.lora_alpha <= 0:
            fail(f"{prefix}.lora_alpha", f"must be positive (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            fail(f"{prefix}.lora_dropout", f"must be in [0, 1) (got {self.lora_dropout})")
        check_choice(f"{prefix}.bias", self.bias, LORA_BIASES)
        if isinstance(self.target_modules, list) and not self.target_modules:
            fail(f"{prefix}.target_modules", "must name at least one module or be 'all-linear'")
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


# Method name -> its section of options; the section has the method's name in the config.
METHOD_SECTIONS: dict[str, type] = {
    "lora": LoraSection,
    "prefix": PrefixSection,
    "prompt": PromptSection,
    "ptuning": PTuningSection,
    "ia3": IA3Section,
    "freeze": FreezeSection,
    "full": FullSection,
}


@dataclass
class MethodConfig:
    """The tuning method; its options are in the section of the same name."""

    name: str = opt("lora", "lora, prefix, prompt, ptuning, ia3, freeze or full.")

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.name", self.name, tuple(METHOD_SECTIONS))
