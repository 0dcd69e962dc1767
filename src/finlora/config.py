"""Typed run configuration: YAML recipes, dotted `--set key=value` overrides, validation.

One dataclass per concern (model, data, lora, train). Each validates itself where it is built,
and every error names the dotted key and what was allowed, e.g.
`config: lora.r must be a positive integer (got 0)`.
"""

from __future__ import annotations

import dataclasses
import os
import re
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


@dataclass
class ModelConfig:
    # A registered name (`finlora models`), a local Hugging Face model directory, or a .gguf file.
    name: str = "smollm2-135m-instruct"
    # Loading code from a model directory runs arbitrary Python: off unless the user says so.
    trust_remote_code: bool = False

    def validate(self, prefix: str) -> None:
        if not self.name.strip():
            _fail(f"{prefix}.name", "must not be empty")


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

    def resolved_path(self) -> str | None:
        """The data path to read, after the $FINLORA_FPB_DIR fallback; None means synthetic."""
        if self.format == "synthetic":
            return None
        if self.path:
            return self.path
        return os.environ.get(FPB_ENV) or None


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


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTIONS = ("auto", "eager", "sdpa")


@dataclass
class TrainConfig:
    epochs: int = 2
    # Optimizer steps in all; when set it ends training early (and sets the LR schedule length).
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    device: str = "auto"
    # "auto": bf16 autocast where the hardware has bf16 instructions, else fp32.
    precision: str = "auto"
    # Speed switches (issue 3); each one leaves the loss and the scores unchanged.
    group_by_length: bool = True
    label_logits_only: bool = True
    # "auto": eager attention on the CPU, where SDPA's flash kernel is slow for the short
    # sequences of sentence classification (its backward pass alone costs ~15% of a step).
    attention: str = "auto"
    # Under bf16 autocast, keep the frozen linear weights in bf16 instead of re-casting them at
    # every forward pass (autocast caches casts only for weights that require grad).
    bf16_frozen_weights: bool = True
    threads: int | None = None
    checkpoint_every: int = 200
    log_every: int = 10
    eval_batch_size: int = 32

    def validate(self, prefix: str) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "checkpoint_every": self.checkpoint_every,
            "log_every": self.log_every,
            "eval_batch_size": self.eval_batch_size,
        }
        for name, value in positive.items():
            if value <= 0:
                _fail(f"{prefix}.{name}", f"must be a positive integer (got {value})")
        if self.max_steps is not None and self.max_steps <= 0:
            _fail(
                f"{prefix}.max_steps", f"must be a positive integer or null (got {self.max_steps})"
            )
        if self.threads is not None and self.threads <= 0:
            _fail(f"{prefix}.threads", f"must be a positive integer or null (got {self.threads})")
        if self.learning_rate <= 0:
            _fail(f"{prefix}.learning_rate", f"must be positive (got {self.learning_rate})")
        if self.weight_decay < 0:
            _fail(f"{prefix}.weight_decay", f"must be >= 0 (got {self.weight_decay})")
        _check_fraction(f"{prefix}.warmup_ratio", self.warmup_ratio, allow_zero=True)
        if self.device not in DEVICES:
            _fail(f"{prefix}.device", f"must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.attention not in ATTENTIONS:
            allowed = ", ".join(ATTENTIONS)
            _fail(f"{prefix}.attention", f"must be one of {allowed} (got {self.attention!r})")
        if self.precision not in PRECISIONS:
            allowed = ", ".join(PRECISIONS)
            _fail(f"{prefix}.precision", f"must be one of {allowed} (got {self.precision!r})")


@dataclass
class RunConfig:
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what is plainly a number.
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
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


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; raises FinloraError naming the offending key."""
    return typing.cast(RunConfig, _build(RunConfig, data, ""))


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
    """Apply `a.b=value` overrides to a nested dict (a copy is returned)."""
    import copy

    result = copy.deepcopy(data)
    for item in overrides:
        parts, value = _parse_override(item)
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise FinloraError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return result


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; raises FinloraError for a missing, empty or malformed file."""
    if not path.is_file():
        raise FinloraError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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


def load_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except FinloraError as exc:
        if path is None:
            raise
        raise FinloraError(f"{path}: {exc}") from None
