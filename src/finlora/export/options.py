"""What `finlora export` was asked for (ExportOptions), what it wrote and found (ExportResult)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finlora.errors import FinloraError
from finlora.export.gguf_writer import TENSOR_TYPES

FORMATS = ("hf", "state_dict", "gguf")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Largest |logit difference| accepted between the written model and the adapter model, by the
# precision of the written weights: f32 differs only by the rounding of W0 + B·A.
TOLERANCES = {"f32": 1e-2, "f16": 0.5, "bf16": 2.0}


@dataclass(frozen=True)
class ExportOptions:
    """What `finlora export` was asked for; validated where it is built."""

    format: str
    out: Path
    dtype: str | None = None  # f32 | f16 | bf16; default f32 (hf, state_dict), f16 (gguf)
    quant: str | None = None  # gguf only: q8_0, q4_0, ... (or f32/f16/bf16)
    verify: bool = True
    verify_n: int | None = 32  # sentences checked; None: the whole test split
    overwrite: bool = False
    tolerance: float | None = None  # None: TOLERANCES[dtype]

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise FinloraError(f"--format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise FinloraError(f"--dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.quant is not None:
            if self.format != "gguf":
                raise FinloraError("--quant applies to --format gguf only (use --dtype)")
            if self.dtype is not None:
                raise FinloraError("give --dtype or --quant, not both (both set the GGUF type)")
            if self.quant not in TENSOR_TYPES:
                raise FinloraError(
                    f"--quant: {self.quant!r} is not one of {', '.join(TENSOR_TYPES)}"
                )
        if self.verify_n is not None and self.verify_n < 1:
            raise FinloraError(f"--verify-n: must be a positive number or 'all' ({self.verify_n})")
        if self.tolerance is not None and not self.tolerance > 0:
            raise FinloraError(f"--tolerance: must be positive ({self.tolerance})")

    @property
    def weights_dtype(self) -> str:
        """The precision of the written Hugging Face weights (and of the no-op check)."""
        return self.dtype or "f32"

    @property
    def tensor_type(self) -> str:
        """GGUF tensor type: --quant, else --dtype, else f16."""
        return self.quant or self.dtype or "f16"


@dataclass
class Verification:
    n: int = 0  # sentences (classify) or records (instruct) checked
    data: str = ""  # where they came from
    max_abs_logit_diff: float | None = None
    tolerance: float | None = None
    label_agreement: float | None = None  # written model vs adapter model (classify)
    accuracy: float | None = None  # written model vs gold labels (test split sentences only)
    # Instruct runs: answer tokens checked, and the share whose most likely next token the
    # written model and the adapter model share (the gguf_ fields below then count tokens too).
    answer_tokens: int | None = None
    token_agreement: float | None = None
    changed_tensors: int = 0  # tensors the merge changed, of `tensors`
    tensors: int = 0
    gguf_checked: bool = False
    gguf_agreement: float | None = None  # llama.cpp labels (next tokens) vs the adapter model's
    gguf_n: int | None = None
    gguf_tokens_equal: float | None = None  # prompts llama.cpp tokenizes exactly as finlora
    gguf_accuracy: float | None = None
    # Largest |label (answer token) log-likelihood difference| against the adapter model, on
    # equal tokens.
    gguf_max_abs_loglik_diff: float | None = None
    # The agreement it had to reach: the type's floor, or more where one answer dominates.
    gguf_required_agreement: float | None = None
    gguf_note: str | None = None


@dataclass
class ExportResult:
    task: str
    format: str
    out: Path
    files: list[str]
    method: str
    dtype: str
    verified: bool
    verification: Verification = field(default_factory=Verification)

    def to_dict(self) -> dict[str, Any]:
        """One flat JSON object: what was written and how it was checked."""
        head = {
            "task": self.task,
            "format": self.format,
            "out": str(self.out),
            "files": self.files,
            "method": self.method,
            "dtype": self.dtype,
            "verified": self.verified,
        }
        return head | asdict(self.verification)

    def summary(self) -> list[str]:
        """What was written and how it checked out, for people."""
        v = self.verification
        lines = [f"wrote {self.format} ({self.dtype}) to {self.out}: {', '.join(self.files)}"]
        if not self.verified:
            return [*lines, "not verified (--no-verify)"]
        if self.task != "classify":  # instruct, preference: answer tokens
            unit, agreeing, agree = "records", "next tokens", v.token_agreement
            checked, scored = f"{v.n} records ({v.answer_tokens} answer tokens)", "answer-token"
        else:
            unit, agreeing, agree = "sentences", "labels", v.label_agreement
            checked, scored = f"{v.n} sentences", "label"
        # A GGUF's Hugging Face side is the merged model it was written from; only llama.cpp
        # reads the file itself.
        what = "merged weights (before GGUF) checked" if self.format == "gguf" else "verified"
        lines.append(
            f"{what} on {checked}: max |logit diff| {v.max_abs_logit_diff:.3g} "
            f"(tolerance {v.tolerance:g}), {agreeing} agree {agree:.1%}"
        )
        if v.gguf_checked:
            lines.append(
                f"llama.cpp: {agreeing} agree {v.gguf_agreement:.1%} on {v.gguf_n} {unit}, "
                f"tokenization equal {v.gguf_tokens_equal:.1%}, "
                f"max |{scored} log-likelihood diff| {v.gguf_max_abs_loglik_diff:.3g} "
                f"(required agreement {v.gguf_required_agreement:.1%})"
            )
        if v.gguf_note:
            lines.append(v.gguf_note)
        return lines
