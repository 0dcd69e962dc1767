"""Typed run configuration: YAML recipes, dotted `--set key=value` overrides, validation.

One dataclass per concern (model, data, method, train, speed, and one section of options per
tuning method: lora, prefix, prompt, ptuning, ia3, freeze, full). Each validates itself where it
is built, and every error names the dotted key and what was allowed, e.g.
`config: lora.r must be a positive integer (got 0)`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finlora.errors import FinloraError

FPB_ENV = "FINLORA_FPB_DIR"


def _fail(key: str, message: str) -> typing.NoReturn:
    raise FinloraError(f"config: {key} {message}")


def _check_fraction(key: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        bound = "0 <= x < 1" if allow_zero else "0 < x < 1"
        _fail(key, f"must be a fraction with {bound} (got {value})")


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(key, f"must be one of {', '.join(allowed)} (got {value!r})")


# causal: decoder-only LM; seq2seq: encoder-decoder LM (T5, mT0), the label text as decoder
# target; encoder: an encoder with a classification head (BERT, MiniLM), one logit per label.
MODEL_KINDS = ("auto", "causal", "seq2seq", "encoder")


@dataclass
class ModelConfig:
    # A registered name (`finlora models`), a local Hugging Face model directory, or a .gguf file.
    name: str = "smollm2-135m-instruct"
    # "auto" reads it from the model's config.json (or the registry); set it where that guesses
    # wrong, e.g. a bare encoder checkpoint whose architectures list names no head.
    kind: str = "auto"
    # Loading code from a model directory runs arbitrary Python: off unless the user says so.
    trust_remote_code: bool = False

    def validate(self, prefix: str) -> None:
        if not self.name.strip():
            _fail(f"{prefix}.name", "must not be empty")
        _check_choice(f"{prefix}.kind", self.kind, MODEL_KINDS)


DATA_FORMATS = ("auto", "fpb", "csv", "tsv", "jsonl", "synthetic")
FPB_AGREEMENTS = ("all", "75", "66", "50")


@dataclass
class DataConfig:
    # File or directory; empty means $FINLORA_FPB_DIR, and failing that the synthetic set.
    path: str | None = None
    format: str = "auto"
    agreement: str = "all"
    text_column: str = "text"
    label_column: str = "label"
    # Raw label value -> label name, e.g. "0=negative,1=neutral,2=positive".
    label_map: str | None = None
    # Canonical label set and its order; empty means the labels found in the data, sorted.
    labels: list[str] = field(default_factory=list)
    test_fraction: float = 0.1
    val_fraction: float = 0.1
    synthetic_size: int = 600
    # Prompt template: a name shipped with finlora (`templates/`) or a path to a JSON file.
    template: str = "sentiment"
    max_length: int = 128

    def validate(self, prefix: str) -> None:
        if self.format not in DATA_FORMATS:
            _fail(
                f"{prefix}.format",
                f"must be one of {', '.join(DATA_FORMATS)} (got {self.format!r})",
            )
        if self.agreement not in FPB_AGREEMENTS:
            allowed = ", ".join(FPB_AGREEMENTS)
            _fail(f"{prefix}.agreement", f"must be one of {allowed} (got {self.agreement!r})")
        _check_fraction(f"{prefix}.test_fraction", self.test_fraction, allow_zero=False)
        _check_fraction(f"{prefix}.val_fraction", self.val_fraction, allow_zero=True)
        if self.synthetic_size < 30:
            _fail(f"{prefix}.synthetic_size", f"must be at least 30 (got {self.synthetic_size})")
        if self.max_length < 8:
            _fail(f"{prefix}.max_length", f"must be at least 8 tokens (got {self.max_length})")
        if len(set(self.labels)) != len(self.labels):
            _fail(f"{prefix}.labels", f"has duplicates ({self.labels})")
        if self.text_column == self.label_column:
            _fail(f"{prefix}.label_column", f"must differ from {prefix}.text_column")

    def resolved_path(self) -> str | None:
        """The data path to read, after the $FINLORA_FPB_DIR fallback; None means synthetic."""
        if self.format == "synthetic":
            return None
        if self.path:
            return self.path
        return os.environ.get(FPB_ENV) or None


def _check_learning_rate(key: str, value: float | None) -> None:
    if value is not None and value <= 0:
        _fail(key, f"must be positive or null (got {value})")


def _check_positive(key: str, value: int) -> None:
    if value <= 0:
        _fail(key, f"must be a positive integer (got {value})")


# Every method section has `learning_rate`: null means train.learning_rate. The methods differ
# by orders of magnitude in the rate they train well at (a handful of prompt vectors against
# every weight of the model), so the non-LoRA sections carry the rate their papers and the
# PEFT examples use; LoRA keeps train.learning_rate, which the FPB recipe is tuned for.

LORA_BIASES = ("none", "all", "lora_only")


@dataclass
class LoraSection:
    r: int = 16
    lora_alpha: int = 32
    # Off by default: on a CPU, drawing dropout masks for every adapted layer costs about a
    # quarter of a training step, and one or two epochs of LoRA hardly overfit.
    lora_dropout: float = 0.0
    # Module names, or "all-linear" for every linear layer but the output head.
    target_modules: list[str] | str = "all-linear"
    bias: str = "none"
    learning_rate: float | None = None

    def validate(self, prefix: str) -> None:
        if self.r <= 0:
            _fail(f"{prefix}.r", f"must be a positive integer (got {self.r})")
        if self.lora_alpha <= 0:
            _fail(f"{prefix}.lora_alpha", f"must be positive (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            _fail(f"{prefix}.lora_dropout", f"must be in [0, 1) (got {self.lora_dropout})")
        if self.bias not in LORA_BIASES:
            _fail(f"{prefix}.bias", f"must be one of {', '.join(LORA_BIASES)} (got {self.bias!r})")
        if isinstance(self.target_modules, list) and not self.target_modules:
            _fail(f"{prefix}.target_modules", "must name at least one module or be 'all-linear'")
        _check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


@dataclass
class PrefixSection:
    """Prefix tuning (Li & Liang, 2021): trained key/value vectors before every layer."""

    num_virtual_tokens: int = 20
    # Reparameterise the prefix through a 2-layer MLP (the paper's trick for stable training).
    prefix_projection: bool = False
    encoder_hidden_size: int = 512  # the MLP's width, with prefix_projection only
    learning_rate: float | None = 1e-2

    def validate(self, prefix: str) -> None:
        _check_positive(f"{prefix}.num_virtual_tokens", self.num_virtual_tokens)
        _check_positive(f"{prefix}.encoder_hidden_size", self.encoder_hidden_size)
        _check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


PROMPT_INITS = ("text", "random")
PROMPT_INIT_TEXTS = {
    "classify": "Classify the sentiment of this financial news as negative, neutral or positive:",
    "instruct": "Answer the following financial question or task accurately and concisely:",
}


@dataclass
class PromptSection:
    """Prompt tuning (Lester et al., 2021): trained input embeddings before the prompt."""

    num_virtual_tokens: int = 20
    # "text" starts the virtual tokens at the embeddings of `init_text` (repeated to fill
    # them), which trains far better on small models than random vectors. null: a text for the
    # run's task (PROMPT_INIT_TEXTS), so an instruct run does not start from a sentiment cue.
    init: str = "text"
    init_text: str | None = None
    learning_rate: float | None = 3e-2

    def validate(self, prefix: str) -> None:
        _check_positive(f"{prefix}.num_virtual_tokens", self.num_virtual_tokens)
        _check_choice(f"{prefix}.init", self.init, PROMPT_INITS)
        if self.init == "text" and self.init_text is not None and not self.init_text.strip():
            _fail(f"{prefix}.init_text", "must not be empty when prompt.init is text")
        _check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


PTUNING_ENCODERS = ("MLP", "LSTM")


@dataclass
class PTuningSection:
    """P-tuning (Liu et al., 2021): virtual token embeddings produced by a small prompt encoder."""

    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128
    encoder_reparameterization_type: str = "MLP"
    learning_rate: float | None = 1e-3

    def validate(self, prefix: str) -> None:
        _check_positive(f"{prefix}.num_virtual_tokens", self.num_virtual_tokens)
        _check_positive(f"{prefix}.encoder_hidden_size", self.encoder_hidden_size)
        _check_choice(
            f"{prefix}.encoder_reparameterization_type",
            self.encoder_reparameterization_type,
            PTUNING_ENCODERS,
        )
        _check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


@dataclass
class IA3Section:
    """(IA)^3 (Liu et al., 2022): learned vectors that rescale keys, values and FFN activations."""

    # null: PEFT's choice for the architecture (Llama: k_proj, v_proj, down_proj; T5: k, v, wo).
    target_modules: list[str] | None = None
    # The subset of target_modules that are feed-forward layers (scaled on their input).
    feedforward_modules: list[str] | None = None
    learning_rate: float | None = 3e-3

    def validate(self, prefix: str) -> None:
        if self.target_modules is not None and not self.target_modules:
            _fail(f"{prefix}.target_modules", "must name at least one module or be null")
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                _fail(f"{prefix}.feedforward_modules", "needs ia3.target_modules set as well")
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                _fail(
                    f"{prefix}.feedforward_modules",
                    f"must be a subset of ia3.target_modules ({extra[0]!r} is not)",
                )
        _check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


@dataclass
class FreezeSection:
    """Freeze tuning: train only the top `layers` transformer blocks (and what follows them)."""

    layers: int = 2
    learning_rate: float | None = 1e-4

    def validate(self, prefix: str) -> None:
        if self.layers <= 0:
            _fail(f"{prefix}.layers", f"must be a positive integer (got {self.layers})")
        _check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


@dataclass
class FullSection:
    """Full fine-tuning: every weight trains."""

    learning_rate: float | None = 5e-5

    def validate(self, prefix: str) -> None:
        _check_learning_rate(f"{prefix}.learning_rate", self.learning_rate)


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
    # The tuning method; its options are in the config section of the same name.
    name: str = "lora"

    def validate(self, prefix: str) -> None:
        _check_choice(f"{prefix}.name", self.name, tuple(METHOD_SECTIONS))


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTIONS = ("auto", "eager", "sdpa")


@dataclass
class TrainConfig:
    # One epoch: on Financial PhraseBank validation accuracy is already ~0.95-0.98 after it.
    epochs: int = 1
    # Optimizer steps in all; when set it ends training early (and sets the LR schedule length).
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    device: str = "auto"
    # "auto": bf16 autocast where the hardware has bf16 instructions and, on a CPU, its bf16
    # matmuls measure faster than fp32's; else fp32.
    precision: str = "auto"
    checkpoint_every: int = 200
    log_every: int = 10

    def validate(self, prefix: str) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "checkpoint_every": self.checkpoint_every,
            "log_every": self.log_every,
        }
        for name, value in positive.items():
            if value <= 0:
                _fail(f"{prefix}.{name}", f"must be a positive integer (got {value})")
        if self.max_steps is not None and self.max_steps <= 0:
            _fail(
                f"{prefix}.max_steps", f"must be a positive integer or null (got {self.max_steps})"
            )
        if self.learning_rate <= 0:
            _fail(f"{prefix}.learning_rate", f"must be positive (got {self.learning_rate})")
        if self.max_grad_norm <= 0:  # clipping to a negative norm would climb the loss
            _fail(f"{prefix}.max_grad_norm", f"must be positive (got {self.max_grad_norm})")
        if self.weight_decay < 0:
            _fail(f"{prefix}.weight_decay", f"must be >= 0 (got {self.weight_decay})")
        _check_fraction(f"{prefix}.warmup_ratio", self.warmup_ratio, allow_zero=True)
        if self.device not in DEVICES:
            _fail(f"{prefix}.device", f"must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.precision not in PRECISIONS:
            allowed = ", ".join(PRECISIONS)
            _fail(f"{prefix}.precision", f"must be one of {allowed} (got {self.precision!r})")


@dataclass
class SpeedConfig:
    """How a run computes: switches that leave the loss and the scores unchanged."""

    group_by_length: bool = True
    # Scoring (validation, eval, predict): cut the sentences, sorted by length, into batches where
    # their lengths jump, when that saves more padded tokens than a pass costs. Same scores.
    trim_padding: bool = True
    # The output head only at the positions that predict label tokens; prediction with labels of
    # one token also only for those tokens (their softmax needs no vocabulary-wide normalizer).
    label_logits_only: bool = True
    # Labels of several tokens: read each prompt once and continue every label from its cached
    # keys and values, instead of one (prompt + label) row per label. Same scores.
    shared_prompt_scoring: bool = True
    # "auto": eager attention on the CPU, where SDPA's flash kernel is slow for the short
    # sequences of sentence classification (its backward pass alone costs ~15% of a step).
    attention: str = "auto"
    # Under bf16 autocast, keep the frozen linear weights in bf16 instead of re-casting them at
    # every forward pass (autocast caches casts only for weights that require grad).
    bf16_frozen_weights: bool = True
    # Under bf16 autocast, a frozen output head gets its own bf16 weight (untied from the fp32
    # input embeddings) instead of autocast re-casting the whole vocabulary matrix every pass.
    bf16_head: bool = True
    # Under bf16 autocast, scoring casts each norm output to bf16 once instead of once per
    # projection that reads it (q, k, v; gate, up). Same scores to the bit; off: on an AMX CPU
    # it measured slower than fuse_projections alone, whose stacked matmuls cast once anyway.
    cast_norms_once: bool = False
    # Padded tokens per forward/backward pass: a longer batch is split into micro-batches whose
    # gradients add up to the whole batch's (same update), bounding peak activation memory.
    # "auto": 448 in fp32 (the whole FPB run under 2.5 GB; at 512 it peaked at 2.54 GB, and
    # 1,024 was no faster), 512 under bf16 autocast. There, with the fused decoder layers, the
    # FPB run peaked at 2.03-2.08 GiB at 512, 2.23-2.33 GiB (up to 2.50 GB) at 640 and 2.60 GiB
    # at 1,024, for 199-217, 192-198 and 194 s on 2 AMX cores (stops 17-18).
    max_batch_tokens: int | str | None = "auto"
    # LoRA layers add B·A·x into the base output inside its GEMM (one pass over the output
    # instead of three); same function and state dict as PEFT's layer, which `false` keeps.
    fused_lora: bool = True
    # Llama-family decoder layers train as two hand-written autograd operations (attention half,
    # MLP half): stacked q/k/v and gate/up matmuls that also compute x·A of every LoRA layer,
    # each tensor cast once, no per-operation autograd bookkeeping. Same loss and gradients to
    # float rounding; layers it does not cover (and compiled ones) keep the modules' forward.
    fused_decoder: bool = True
    # torch.compile each decoder layer (dynamic shapes): fuses the elementwise work between the
    # matmuls. Costs a minute or more of compiling at the start; no gain measured on an fp32 CPU.
    compile: bool = False
    # SiLU-gated (Llama-style) MLPs recompute the SiLU in the backward pass instead of keeping
    # it: the same gradients, with about an eighth less activation memory.
    lean_mlp: bool = True
    # Inference (scoring, no key/value cache) runs Llama-family eager attention with fewer passes
    # over memory: rotary embedding, mask and softmax in place, no per-head copies of k and v.
    # Same scores (bit for bit under bf16 autocast in the tests; to float rounding in fp32). On 2
    # AMX cores: median round ratios 1.07 and 1.072 over 3 and 6 rounds (stop 17; stop 16's
    # two runs gave +6% and -4%); no gain in fp32.
    lean_attention: bool = True
    # Keep only each layer's input during the forward pass and recompute the rest in the
    # backward pass: activation memory drops to a small fraction, for about a third more compute.
    gradient_checkpointing: bool = False
    # With gradient_checkpointing, recompute only every n-th layer: 2 keeps about half the
    # memory saving for about half the extra compute.
    gradient_checkpointing_every: int = 1
    threads: int | None = None
    # Prediction and evaluation fold a LoRA/IA3 adapter into the weights first (same scores to
    # float rounding, fewer operations); off keeps the adapter layers as trained.
    merge_for_inference: bool = True
    # Prediction and evaluation stack the projections that read one input (q, k, v; gate, up)
    # into one matmul each, without copying a weight. Same scores to float rounding.
    fuse_projections: bool = True
    eval_batch_size: int = 32

    def validate(self, prefix: str) -> None:
        for name in ("eval_batch_size", "gradient_checkpointing_every"):
            _check_positive(f"{prefix}.{name}", getattr(self, name))
        budget = self.max_batch_tokens
        too_small = isinstance(budget, int) and budget < 16
        if too_small or (isinstance(budget, str) and budget != "auto"):
            _fail(f"{prefix}.max_batch_tokens", f"must be at least 16, auto or null (got {budget})")
        if self.threads is not None and self.threads <= 0:
            _fail(f"{prefix}.threads", f"must be a positive integer or null (got {self.threads})")
        _check_choice(f"{prefix}.attention", self.attention, ATTENTIONS)


# classify: a label per text (scored label tokens or a head); instruct: instruction -> answer
# (Alpaca or chat records, loss on the answer tokens, generation metrics).
TASKS = ("classify", "instruct")
INSTRUCT_TEMPLATE = "chat"  # the instruct task's default: the model's own chat template


@dataclass
class RunConfig:
    seed: int = 42
    task: str = "classify"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    prefix: PrefixSection = field(default_factory=PrefixSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    ptuning: PTuningSection = field(default_factory=PTuningSection)
    ia3: IA3Section = field(default_factory=IA3Section)
    freeze: FreezeSection = field(default_factory=FreezeSection)
    full: FullSection = field(default_factory=FullSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def validate(self, prefix: str) -> None:
        _check_choice("task", self.task, TASKS)
        if not 0 <= self.seed < 2**32:  # what numpy and scikit-learn take
            _fail("seed", f"must be between 0 and 2**32 - 1 (got {self.seed})")
        if self.task == "instruct" and self.data.format not in ("auto", "jsonl"):
            _fail(
                "data.format",
                f"must be auto or jsonl for task instruct (got {self.data.format!r}); "
                "instruction files are Alpaca or chat records in .json or .jsonl",
            )

    @property
    def method_options(self) -> Any:
        """The options section of the chosen method, e.g. `self.lora` for method lora."""
        return getattr(self, self.method.name)

    @property
    def learning_rate(self) -> float:
        """The chosen method's learning rate, else train.learning_rate."""
        own = self.method_options.learning_rate
        return float(own) if own is not None else self.train.learning_rate

    def to_dict(self) -> dict[str, Any]:
        """Plain data; only the chosen method's section, so the result loads back as is."""
        data = dataclasses.asdict(self)
        for name in METHOD_SECTIONS:
            if name != self.method.name:
                del data[name]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- building from plain data ------------------------------------------------------------------


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except FinloraError as exc:
                errors.append(exc)
        if len(errors) == 1:  # `float | None`: the float's own reason ("must be finite")
            raise errors[0]
        allowed = " or ".join(_type_name(o) for o in options if o is not type(None))
        _fail(key, f"must be {allowed} (got {value!r})")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            _fail(key, f"must be a list (got {value!r})")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what is plainly a number.
        numeric = isinstance(value, str) and _NUMBER.fullmatch(value.strip())
        if numeric or (isinstance(value, int | float) and not isinstance(value, bool)):
            number = float(value)
            if not math.isfinite(number):  # YAML's .inf and .nan: no setting wants them
                _fail(key, f"must be a finite number (got {value!r})")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the annotations above are used
        raise TypeError(f"unsupported annotation {tp}")
    _fail(key, f"must be {_type_name(tp)} (got {value!r})")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(prefix or "top level", f"must be a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise FinloraError(f"config: unknown key '{where}' (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def _check_method_sections(data: dict[str, Any], chosen: str) -> None:
    """Refuse options written for a method other than the chosen one: they would do nothing."""
    for name in METHOD_SECTIONS:
        options = data.get(name)
        if name == chosen or not options:
            continue
        key = f"{name}.{next(iter(options))}" if isinstance(options, dict) else name
        _fail(
            key,
            f"is an option of method {name}, but method.name is {chosen} "
            f"(set method.name={name}, or drop the {name} section)",
        )


def _plain_data_options(section: Any) -> Any:
    """The data section with two natural YAML spellings turned into the settings' own:
    `agreement: 75` (an integer) and `label_map` as a mapping (`0: negative`)."""
    if not isinstance(section, dict):
        return section
    section = dict(section)
    agreement = section.get("agreement")
    if isinstance(agreement, int) and not isinstance(agreement, bool):
        section["agreement"] = str(agreement)
    if isinstance(section.get("label_map"), dict):
        section["label_map"] = ",".join(f"{k}={v}" for k, v in section["label_map"].items())
    return section


# The speed switches were `train.` settings before the `speed:` section; recipes, `--set` flags
# and the config.yaml of runs trained then still spell them so.
SPEED_KEYS = frozenset(f.name for f in dataclasses.fields(SpeedConfig))


def _note_moved(keys: list[str]) -> None:
    if keys:
        names = ", ".join(f"train.{k}" for k in keys)
        print(
            f"finlora: config: {names} moved to speed.* (old spelling still read)", file=sys.stderr
        )


def _both_spellings(key: str) -> typing.NoReturn:
    _fail(
        f"train.{key}",
        f"and speed.{key} are both set (train.{key} is the old spelling); keep speed.{key}",
    )


def _moved_speed_keys(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`data` with its `train.<speed key>` settings moved under `speed`, and the keys moved."""
    train = data.get("train")
    old = [k for k in train if k in SPEED_KEYS] if isinstance(train, dict) else []
    if not old:
        return data, []
    assert isinstance(train, dict)
    speed = data.get("speed")
    if speed is not None and not isinstance(speed, dict):
        _fail("speed", f"must be a mapping (got {speed!r})")
    speed = dict(speed or {})
    for key in old:
        if key in speed:
            _both_spellings(key)
        speed[key] = train[key]
    rest = {k: v for k, v in train.items() if k not in SPEED_KEYS}
    return {**data, "train": rest, "speed": speed}, old


def _moved_speed_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--set` items with `train.<speed key>` spelled `speed.<key>`, and the keys moved."""
    given = {item.partition("=")[0].strip() for item in overrides}
    result, old = [], []
    for item in overrides:
        key, eq, value = item.partition("=")
        name = key.strip().removeprefix("train.")
        if key.strip().startswith("train.") and name in SPEED_KEYS:
            if f"speed.{name}" in given:
                _both_spellings(name)
            old.append(name)
            item = f"speed.{name}{eq}{value}"
        result.append(item)
    return result, old


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; raises FinloraError naming the offending key."""
    data_section = data.get("data")
    if data.get("task") == "instruct" and "template" not in (
        data_section if isinstance(data_section, dict) else {}
    ):
        # The data section's default template is the classifier's; an instruct recipe that
        # names none means the model's own chat template.
        data = {**data, "data": {**(data_section or {}), "template": INSTRUCT_TEMPLATE}}
    data = {**data, "data": _plain_data_options(data.get("data"))}
    data, moved = _moved_speed_keys(data)
    _note_moved(moved)
    cfg = typing.cast(RunConfig, _build(RunConfig, data, ""))
    _check_method_sections(data, cfg.method.name)
    return cfg


def select_method(data: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of config data for method `name`: other methods' sections are dropped.

    For `finlora compare`, which runs one recipe (often with a lora section) with every method.
    """
    result = {k: v for k, v in data.items() if k == name or k not in METHOD_SECTIONS}
    method = result.get("method")
    result["method"] = {**(method if isinstance(method, dict) else {}), "name": name}
    return result


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise FinloraError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    try:
        # YAML scalars: 3 -> int, 3e-4 -> float, true -> bool, null -> None, [a, b] -> list.
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested dict (a copy is returned).

    Speed settings given under `train` (their old place), in `data` or in `overrides`, move
    to `speed`, with one note on stderr naming them.
    """
    import copy

    result, moved = _moved_speed_keys(copy.deepcopy(data))
    overrides, flagged = _moved_speed_overrides(overrides)
    _note_moved(moved + [k for k in flagged if k not in moved])
    for item in overrides:
        parts, value = _parse_override(item)
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                # The file (or an earlier --set) gave this name a value, not a section.
                raise FinloraError(
                    f"--set {item!r}: '{part}' holds a value ({child!r}), not a section"
                )
            node = child
        node[parts[-1]] = value
    return result


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error: YAML keeps the
    last silently, so the first setting would be ignored without a word."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; raises FinloraError for a missing, empty or malformed file."""
    if path.is_dir():
        raise FinloraError(f"{path}: is a directory, not a YAML config file")
    if not path.is_file():
        raise FinloraError(f"{path}: no such file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise FinloraError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise FinloraError(f"{path}{where}: malformed YAML ({problem})") from None
    if data is None:
        raise FinloraError(f"{path}: file is empty")
    if not isinstance(data, dict):
        raise FinloraError(f"{path}: expected a mapping of sections at the top level")
    return data


def _switch_method(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set method.name=X` on a recipe written for another method: the recipe's options for
    other methods no longer apply (options given with --set still must fit X)."""
    for item in overrides:
        parts, value = _parse_override(item)
        if parts == ["method", "name"] and isinstance(value, str):
            data = select_method(data, value)
    return data


def load_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    overrides = overrides or []
    data = read_yaml(path) if path is not None else {}
    try:
        return config_from_dict(apply_overrides(_switch_method(data, overrides), overrides))
    except FinloraError as exc:
        # Name the file only for what the file set: a bad --set value is the flag's.
        keys = {item.partition("=")[0].strip() for item in overrides}
        keys |= {f"speed.{k.removeprefix('train.')}" for k in keys if k.startswith("train.")}
        message = str(exc)
        from_flags = any(
            message.startswith((f"config: {k} ", f"config: unknown key '{k}'")) for k in keys
        )
        if path is None or from_flags or message.startswith("--set "):
            raise
        raise FinloraError(f"{path}: {exc}") from None
