"""The run's sections (model, data, train, speed) and RunConfig, which also holds methods.py's."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finlora.config.fields import (
    check_choice,
    check_fraction,
    check_positive,
    fail,
    opt,
    opt_factory,
)
from finlora.config.methods import (
    METHOD_SECTIONS,
    AdaLoraSection,
    AdapterSection,
    FreezeSection,
    FullSection,
    IA3Section,
    LoraSection,
    MethodConfig,
    PrefixSection,
    PromptSection,
    PTuningSection,
)
from finlora.config.preference import PreferenceSection
from finlora.config.speed import SpeedConfig
from finlora.config.tasks import check_task

FPB_ENV = "FINLORA_FPB_DIR"

MODEL_KINDS = ("auto", "causal", "seq2seq", "encoder")
QUANTIZE_MODES = ("4bit", "8bit")


@dataclass
class ModelConfig:
    """The base model: where it comes from and how it is used."""

    name: str = opt(
        "smollm2-135m-instruct",
        "A registered model name (`finlora models` lists them), a local Hugging Face model "
        "directory, or a .gguf file.",
    )
    kind: str = opt(
        "auto",
        "causal: a decoder-only language model; seq2seq: an encoder-decoder one (T5, mT0), the "
        "label text its decoder target; encoder: an encoder with a classification head (BERT, "
        "MiniLM), one logit per label. auto reads it from the model's config.json (or the "
        "registry); set it where that guesses wrong, e.g. a bare encoder checkpoint whose "
        "architectures name no head.",
    )
    quantize: str | None = opt(
        None,
        "Train over a quantized base (QLoRA, through bitsandbytes: pip install "
        "'finlora[quant]'): 4bit (NF4, double quantization; cpu or cuda) or 8bit (LLM.int8; "
        "cuda) linear weights, for method lora or adalora on causal models. Prediction and "
        "export that merge the adapter dequantize the base to fp32 first. null: fp32 weights.",
    )

    def validate(self, prefix: str) -> None:
        if not self.name.strip():
            fail(f"{prefix}.name", "must not be empty")
        check_choice(f"{prefix}.kind", self.kind, MODEL_KINDS)
        if self.quantize is not None:
            check_choice(f"{prefix}.quantize", self.quantize, QUANTIZE_MODES)


DATA_FORMATS = ("auto", "fpb", "csv", "tsv", "jsonl", "parquet", "xlsx", "hf", "synthetic")
FPB_AGREEMENTS = ("all", "75", "66", "50")
# A source's name becomes part of report file names (eval/test-NAME.json).
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt", ".parquet", ".xlsx")


@dataclass
class DataSource:
    """One labelled file of several in one run (data.sources): how to read it, how many of its
    rows to use, and how much its training rows count."""

    path: str = opt("", "The data file, or a Financial PhraseBank directory.")
    name: str = opt(
        "",
        "The source's name in split.json and in eval's reports (letters, digits, . _ -). "
        "Empty: the file's name without its suffix.",
    )
    format: str = opt(
        "auto", "As data.format, for this file (synthetic aside); auto: by the file's suffix."
    )
    agreement: str = opt("all", "As data.agreement, for a Financial PhraseBank source.")
    text_column: str = opt("text", "The column (CSV, TSV) or key (JSON) holding the text.")
    label_column: str = opt("label", "The column (CSV, TSV) or key (JSON) holding the label.")
    label_map: str | None = opt(
        None,
        'This file\'s raw label value -> label name, e.g. "0=negative,1=positive,2=neutral" '
        "(a YAML mapping works too). null: the raw values are the names.",
    )
    max_rows: int | None = opt(
        None,
        "Training rows of the file used at most: a sample of its training split, stratified "
        "by label and fixed by the run's seed. Validation and test stay the file's own "
        "fractions, the same rows whatever max_rows is. null: every row.",
    )
    weight: float = opt(
        1.0,
        "How many times each training row of this source is drawn per epoch: 2 repeats every "
        "one, 0.5 draws half of them (by seed), 1.5 all once and half again. Validation and "
        "test rows are not weighted.",
    )

    @property
    def resolved_name(self) -> str:
        """`name`, else the file's name without a data suffix, in the characters names take."""
        if self.name:
            return self.name
        base = Path(self.path.rstrip("/\\")).name
        for suffix in _TABLE_SUFFIXES:
            if base.lower().endswith(suffix) and len(base) > len(suffix):
                base = base[: -len(suffix)]
                break
        return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "source"

    def validate(self, prefix: str) -> None:
        if not self.path.strip():
            fail(f"{prefix}.path", "must name a data file or directory")
        if self.name and not _SOURCE_NAME.fullmatch(self.name):
            fail(f"{prefix}.name", f"must be letters, digits, '.', '_' or '-' (got {self.name!r})")
        formats = tuple(f for f in DATA_FORMATS if f != "synthetic")
        check_choice(f"{prefix}.format", self.format, formats)
        check_choice(f"{prefix}.agreement", self.agreement, FPB_AGREEMENTS)
        if self.text_column == self.label_column:
            fail(f"{prefix}.label_column", f"must differ from {prefix}.text_column")
        if self.max_rows is not None and self.max_rows <= 0:
            fail(f"{prefix}.max_rows", f"must be a positive integer or null (got {self.max_rows})")
        if self.weight <= 0:
            fail(f"{prefix}.weight", f"must be positive (got {self.weight})")


# What data.path reads; with data.sources each source sets its own.
_PER_FILE_OPTIONS = {
    "format": "auto",
    "agreement": "all",
    "text_column": "text",
    "label_column": "label",
    "label_map": None,
}


@dataclass
class DataConfig:
    """The data: where it is, how to read it, its labels, the split and the prompt."""

    path: str | None = opt(
        None,
        "A data file or directory. null: $FINLORA_FPB_DIR (Financial PhraseBank) when it is "
        "set, else the synthetic set (when data.sources is empty too).",
    )
    sources: list[DataSource] = opt_factory(
        list,
        "Several labelled files in one run, instead of data.path: each entry a path, its own "
        "format, columns and label_map (onto one label set: data.labels, else the labels "
        "found, sorted), and optional max_rows and weight. Each is split by the run's seed "
        "and the splits pooled; eval reports every source and the pool.",
    )
    format: str = opt(
        "auto",
        "fpb (a Financial PhraseBank directory or Sentences_*.txt file), csv, tsv, jsonl, "
        "parquet, xlsx (the first sheet), hf (a directory written by datasets' save_to_disk), "
        "or synthetic (a generated financial sentiment set). auto: by the file's suffix; a "
        "directory with dataset_info.json is hf, another directory or a .txt file fpb.",
    )
    agreement: str = opt(
        "all",
        "Financial PhraseBank subset by annotator agreement: all, 75, 66 or 50 (per cent).",
    )
    text_column: str = opt("text", "The column (CSV, TSV) or key (JSON) holding the text.")
    label_column: str = opt("label", "The column (CSV, TSV) or key (JSON) holding the label.")
    label_map: str | None = opt(
        None,
        'Raw label value -> label name, e.g. "0=negative,1=neutral,2=positive" (a YAML '
        "mapping works too). null: the raw values are the names.",
    )
    labels: list[str] = opt_factory(
        list,
        "The label set and its order, e.g. [negative, neutral, positive]; rows with other "
        "labels are refused. Empty: the labels found in the data, sorted.",
    )
    test_fraction: float = opt(0.1, "Share of the rows held out for the test (0 < x < 1).")
    val_fraction: float = opt(
        0.1, "Share of the rows held out for validation (0 <= x < 1; 0: no validation)."
    )
    dedup: bool = opt(
        False,
        "Drop from the training split every row whose text a test row repeats, exactly or "
        "once case, whitespace, URLs, $TICKER symbols and punctuation are set aside (split.json "
        "lists them under leakage, found with or without this).",
    )
    synthetic_size: int = opt(600, "Rows of the synthetic set, when it is used (at least 30).")
    template: str = opt(
        "sentiment",
        "The prompt template: a name shipped with finlora (sentiment, alpaca; chat, the model's "
        "own chat template) or the path of a JSON template file. Task instruct defaults to chat.",
    )
    max_length: int = opt(
        128,
        "Tokens per example at most, prompt and answer (at least 8); longer texts are cut, "
        "with a note.",
    )

    def validate(self, prefix: str) -> None:
        check_choice(f"{prefix}.format", self.format, DATA_FORMATS)
        check_choice(f"{prefix}.agreement", self.agreement, FPB_AGREEMENTS)
        check_fraction(f"{prefix}.test_fraction", self.test_fraction, allow_zero=False)
        check_fraction(f"{prefix}.val_fraction", self.val_fraction, allow_zero=True)
        if self.synthetic_size < 30:
            fail(f"{prefix}.synthetic_size", f"must be at least 30 (got {self.synthetic_size})")
        if self.max_length < 8:
            fail(f"{prefix}.max_length", f"must be at least 8 tokens (got {self.max_length})")
        if len(set(self.labels)) != len(self.labels):
            fail(f"{prefix}.labels", f"has duplicates ({self.labels})")
        if self.text_column == self.label_column:
            fail(f"{prefix}.label_column", f"must differ from {prefix}.text_column")
        if self.sources:
            self._validate_sources(prefix)

    def _validate_sources(self, prefix: str) -> None:
        if self.path:
            fail(
                f"{prefix}.path",
                f"and {prefix}.sources are both set (give one file as {prefix}.path, or every "
                f"file as an entry of {prefix}.sources)",
            )
        for name, default in _PER_FILE_OPTIONS.items():
            if getattr(self, name) != default:
                fail(
                    f"{prefix}.{name}",
                    f"applies to {prefix}.path; with {prefix}.sources set it on each source "
                    f"({prefix}.sources[0].{name})",
                )
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            name = source.resolved_name
            if name in seen:
                fail(
                    f"{prefix}.sources[{i}].name",
                    f"{name!r} is also {prefix}.sources[{seen[name]}]'s name (give each source "
                    "its own name)",
                )
            seen[name] = i

    def resolved_path(self) -> str | None:
        """The data path to read, after the $FINLORA_FPB_DIR fallback; None means synthetic,
        or, with data.sources, that the sources are read instead."""
        if self.format == "synthetic" or self.sources:
            return None
        if self.path:
            return self.path
        return os.environ.get(FPB_ENV) or None


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """The optimisation: how long, how fast, on what device, and how often to log and save."""

    # On Financial PhraseBank validation accuracy is already ~0.95-0.98 after one epoch.
    epochs: int = opt(1, "Passes over the training split.")
    max_steps: int | None = opt(
        None,
        "Optimizer steps in all: when set, training ends there (and the learning-rate "
        "schedule is that long). null: epochs decide.",
    )
    batch_size: int = opt(16, "Rows per batch.")
    grad_accum: int = opt(1, "Batches whose gradients add up to one optimizer step.")
    learning_rate: float = opt(
        3e-4, "Peak learning rate, for methods whose section sets none (AdamW, linear decay)."
    )
    weight_decay: float = opt(0.0, "AdamW weight decay (>= 0).")
    warmup_ratio: float = opt(
        0.05, "Share of the steps over which the learning rate rises from 0 (0 <= x < 1)."
    )
    max_grad_norm: float = opt(1.0, "Gradients are clipped to this norm (positive).")
    device: str = opt("auto", "cpu, cuda or mps; auto: cuda, else mps, else cpu.")
    precision: str = opt(
        "auto",
        "fp32; bf16: matrix multiplies under bf16 autocast (weights that train and the "
        "optimizer stay fp32); auto: bf16 where the hardware has it and, on a CPU, its bf16 "
        "matrix multiplies measure faster than fp32's, else fp32.",
    )
    checkpoint_every: int = opt(
        200, "Optimizer steps between checkpoints (the latest is kept, to resume from)."
    )
    log_every: int = opt(10, "Optimizer steps between rows of training loss in metrics.jsonl.")
    packing: bool = opt(
        False,
        "Task instruct: several records per training sequence of up to data.max_length tokens, "
        "each attending only to itself; batch_size counts sequences. Validation is not packed. "
        "Causal models only; not with methods prefix, prompt or ptuning.",
    )
    neftune_alpha: float | None = opt(
        None,
        "NEFTune: noise in ±alpha/sqrt(L·d) on the input embeddings, in training only (L, d: "
        "the row's padded or packed width, the embedding width; the paper uses 5). null: off.",
    )

    def validate(self, prefix: str) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            check_positive(f"{prefix}.{name}", getattr(self, name))
        if self.max_steps is not None and self.max_steps <= 0:
            fail(
                f"{prefix}.max_steps", f"must be a positive integer or null (got {self.max_steps})"
            )
        if self.learning_rate <= 0:
            fail(f"{prefix}.learning_rate", f"must be positive (got {self.learning_rate})")
        if self.max_grad_norm <= 0:  # clipping to a negative norm would climb the loss
            fail(f"{prefix}.max_grad_norm", f"must be positive (got {self.max_grad_norm})")
        if self.weight_decay < 0:
            fail(f"{prefix}.weight_decay", f"must be >= 0 (got {self.weight_decay})")
        check_fraction(f"{prefix}.warmup_ratio", self.warmup_ratio, allow_zero=True)
        check_choice(f"{prefix}.device", self.device, DEVICES)
        check_choice(f"{prefix}.precision", self.precision, PRECISIONS)
        if self.neftune_alpha is not None and not self.neftune_alpha > 0:
            fail(f"{prefix}.neftune_alpha", f"must be positive or null (got {self.neftune_alpha})")


@dataclass
class RunConfig:
    """A whole run: the seed and task, and one section per concern."""

    seed: int = opt(42, "Seeds the split, the new weights and the batch order (0 to 2**32 - 1).")
    task: str = opt(
        "classify",
        "classify: a label per text (scored label tokens, or an encoder's head); instruct: "
        "instruction -> answer (Alpaca or chat records, loss on the answer tokens); "
        "preference: a prompt with a better and a worse answer (DPO, ORPO, KTO; the "
        "preference section), the run then answering as an instruct run.",
    )
    model: ModelConfig = opt_factory(ModelConfig, "The base model.")
    data: DataConfig = opt_factory(DataConfig, "The data, its split and the prompt template.")
    method: MethodConfig = opt_factory(MethodConfig, "The tuning method.")
    lora: LoraSection = opt_factory(LoraSection, "Options of method lora.")
    prefix: PrefixSection = opt_factory(PrefixSection, "Options of method prefix.")
    prompt: PromptSection = opt_factory(PromptSection, "Options of method prompt.")
    ptuning: PTuningSection = opt_factory(PTuningSection, "Options of method ptuning.")
    ia3: IA3Section = opt_factory(IA3Section, "Options of method ia3.")
    freeze: FreezeSection = opt_factory(FreezeSection, "Options of method freeze.")
    full: FullSection = opt_factory(FullSection, "Options of method full.")
    adalora: AdaLoraSection = opt_factory(AdaLoraSection, "Options of method adalora.")
    adapter: AdapterSection = opt_factory(AdapterSection, "Options of method adapter.")
    train: TrainConfig = opt_factory(TrainConfig, "The optimisation and the device.")
    speed: SpeedConfig = opt_factory(SpeedConfig, "Speed and memory switches.")
    preference: PreferenceSection = opt_factory(PreferenceSection, "Options of task preference.")

    def validate(self, prefix: str) -> None:
        check_task(self)
        if not 0 <= self.seed < 2**32:  # what numpy and scikit-learn take
            fail("seed", f"must be between 0 and 2**32 - 1 (got {self.seed})")

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
        """Plain data; only the chosen method's section (and the preference section only for
        task preference), so the result loads back as is."""
        data = dataclasses.asdict(self)
        for name in METHOD_SECTIONS:
            if name != self.method.name:
                del data[name]
        if self.task != "preference":
            del data["preference"]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
