"""Verification: the written model scored against the adapter model, by task.

A classification run is checked on its label scores (classify.py); an instruct run on the
logits at the answer tokens of held-out records (instruct.py). For a GGUF, where
llama-cpp-python is installed, llama.cpp's own scores of the file are checked as well.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from finlora.errors import FinloraError
from finlora.export import llama_cpp as llama_cpp_check
from finlora.export.classify import (
    LabelScores,
    accuracy,
    compare_scores,
    gguf_label_check,
    label_sample,
    label_scores,
)
from finlora.export.instruct import (
    InstructSample,
    TokenScores,
    agreement,
    gguf_token_check,
    instruct_sample,
    token_scores,
)
from finlora.export.load import ExportContext
from finlora.export.options import Verification


class LabelCheck:
    """Classification: label scores on the run's test sentences."""

    unit = "sentences"
    agreeing = "labels"

    def __init__(self, ctx: ExportContext, n: int | None) -> None:
        self.ctx = ctx
        self.sample = label_sample(ctx.run, ctx.label_codec, n)
        self.description = self.sample.description
        self.n = len(self.sample.texts)
        self.prompts = [ctx.label_codec.encode_text(t) for t in self.sample.texts]

    def scores(self, model: Any) -> LabelScores:
        return label_scores(model, self.ctx.label_codec, self.prompts)

    def compare(self, reference: LabelScores, candidate: LabelScores, v: Verification) -> None:
        v.max_abs_logit_diff, v.label_agreement = compare_scores(reference, candidate)
        v.accuracy = accuracy(candidate.labels, self.sample.gold)

    def gguf(self, path: Path, reference: LabelScores) -> llama_cpp_check.Agreement:
        return gguf_label_check(path, self.ctx.label_codec, self.sample, reference)

    def majority_share(self, reference: LabelScores) -> float:
        return majority_share(reference.labels)


class AnswerCheck:
    """Instruct: the logits at the answer tokens of the run's test records, teacher-forced."""

    unit = "records"
    agreeing = "next tokens"

    def __init__(self, ctx: ExportContext, n: int | None) -> None:
        self.ctx = ctx
        self.sample: InstructSample = instruct_sample(ctx.run, ctx.instruct_codec, n)
        if not self.sample.features:
            raise FinloraError(f"{ctx.run.root}: no record to verify the export on")
        self.description = self.sample.description
        self.n = len(self.sample.features)

    def scores(self, model: Any) -> TokenScores:
        return token_scores(model, self.ctx.instruct_codec, self.sample)

    def compare(self, reference: TokenScores, candidate: TokenScores, v: Verification) -> None:
        pairs = zip(reference.logits, candidate.logits, strict=True)
        v.max_abs_logit_diff = max(float((a - b).abs().max()) for a, b in pairs)
        v.token_agreement = agreement(reference.predicted, candidate.predicted)
        v.answer_tokens = self.sample.tokens

    def gguf(self, path: Path, reference: TokenScores) -> llama_cpp_check.Agreement:
        return gguf_token_check(path, self.ctx.instruct_codec, self.sample, reference)

    def majority_share(self, reference: TokenScores) -> float:
        return majority_share(reference.predicted)


class Check(Protocol):
    """What export_run needs of a task's check; the scores' type is the check's own."""

    unit: str  # what n counts
    agreeing: str  # what the agreement counts
    description: str  # where the sample came from
    n: int

    def scores(self, model: Any) -> Any: ...
    def compare(self, reference: Any, candidate: Any, v: Verification) -> None: ...
    def gguf(self, path: Path, reference: Any) -> llama_cpp_check.Agreement: ...
    def majority_share(self, reference: Any) -> float: ...


CHECKS: dict[str, Callable[[ExportContext, int | None], Check]] = {
    "classify": LabelCheck,
    "instruct": AnswerCheck,
    "preference": AnswerCheck,  # the prompts and chosen answers of its test records
}


def verify_written(check: Check, reference: Any, written: Any, v: Verification) -> None:
    check.compare(reference, check.scores(written), v)
    if (v.max_abs_logit_diff or 0.0) > (v.tolerance or 0.0):
        agree = v.label_agreement if v.token_agreement is None else v.token_agreement
        raise FinloraError(
            f"verification failed: the exported model's logits differ from the adapter model's "
            f"by up to {v.max_abs_logit_diff:.4g} (tolerance {v.tolerance:g}, "
            f"{check.agreeing} agree {agree:.3f}); nothing written"
        )


# The least share of labels (most likely next tokens) that llama.cpp must score as the adapter
# model does, by GGUF type. Measured (docs/benchmarks.md): f16 and q8_0 1.000 on FPB labels and
# 0.997 and 0.973 on instruct next tokens, q5_0 and q4_0 0.969 on 64 FPB labels. A file whose
# tensors are misnamed or laid out wrong scores near chance, or gives the majority label
# throughout, instead.
GGUF_AGREEMENT_FLOORS = {"f32": 0.9, "f16": 0.9, "bf16": 0.9, "q8_0": 0.9}
GGUF_AGREEMENT_FLOOR_FEWER_BITS = 0.75  # q5_*, q4_*
# A fixed floor assumes a class balance: on data where one label is 95% of the checked
# sentences, a file that always says that label would pass 90%. So llama.cpp must also agree on
# at least this share of the sentences the majority label does not cover.
GGUF_MARGIN_OVER_MAJORITY = 0.5


def majority_share(predicted: Sequence[int]) -> float:
    """The share of the most frequent prediction: what a constant answer would agree on."""
    if not predicted:
        return 0.0
    return max(Counter(predicted).values()) / len(predicted)


def required_agreement(tensor_type: str, majority: float) -> float:
    """The agreement a GGUF of `tensor_type` must reach when the adapter model's most frequent
    answer covers `majority` of the checked sentences (records' next tokens)."""
    floor = GGUF_AGREEMENT_FLOORS.get(tensor_type, GGUF_AGREEMENT_FLOOR_FEWER_BITS)
    return max(floor, majority + GGUF_MARGIN_OVER_MAJORITY * (1.0 - majority))


def verify_gguf(
    check: Check, path: Path, reference: Any, v: Verification, tensor_type: str
) -> None:
    """llama.cpp on the written GGUF against the adapter model, where llama.cpp is installed;
    an error when they agree less than the GGUF type allows."""
    if not llama_cpp_check.available():
        v.gguf_note = (
            f"the GGUF file itself is unchecked: {llama_cpp_check.INSTALL_HINT} to check it in "
            "llama.cpp"
        )
        return
    found = check.gguf(path, reference)
    v.gguf_checked, v.gguf_n = True, check.n
    v.gguf_agreement, v.gguf_tokens_equal = found.agreement, found.tokens_equal
    v.gguf_max_abs_loglik_diff, v.gguf_accuracy = found.max_abs_loglik_diff, found.accuracy
    majority = check.majority_share(reference)
    floor = required_agreement(tensor_type, majority)
    v.gguf_required_agreement = round(floor, 4)
    if majority >= 1.0:
        v.gguf_note = (
            f"the adapter model gives every checked {check.unit[:-1]} the same answer, so "
            "agreement cannot tell a broken file from a good one (check more with --verify-n all)"
        )
    if found.agreement < floor:
        raise FinloraError(
            f"verification failed: in llama.cpp the {tensor_type} GGUF gives the adapter model's "
            f"{check.agreeing} on only {found.agreement:.1%} of {check.n} {check.unit} (at least "
            f"{floor:.1%} expected: the most frequent answer alone covers {majority:.1%}; "
            f"tokenization equal on {found.tokens_equal:.1%}); nothing written (--no-verify "
            "writes it unchecked)"
        )
