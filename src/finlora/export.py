"""Export recipe: merge a run's adapter into its base model, write it out, and verify it.

A LoRA update B·A (times lora_alpha / r) added into W0 runs at no extra cost and leaves finlora:
  hf          a plain transformers checkpoint (safetensors, tokenizer, generation config, chat
              template, model card) that loads with neither finlora nor peft installed
  state_dict  the merged weights as one safetensors file
  gguf        one file for llama.cpp (Llama architecture), f16, q8_0, ...

Other tools' merges have been seen to export the base model unchanged, or a model whose outputs
differ from the adapter's. So every export is checked before it is moved into place: the adapter
must hold a non-zero update, the merge must change the weights, and the written model's logits
must match the adapter model's on sample prompts (and, for GGUF where llama-cpp-python is
installed, llama.cpp's predictions must agree with the Hugging Face model's). A classification
run is checked on its label scores (export_classify.py); an instruct run on the logits at the
answer tokens of held-out records (export_instruct.py). A failed check leaves nothing at --out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finlora import atomic
from finlora.config import RunConfig
from finlora.errors import FinloraError
from finlora.export_classify import (
    LabelScores,
    accuracy,
    compare_scores,
    gguf_label_check,
    label_sample,
    label_scores,
)
from finlora.export_instruct import (
    InstructSample,
    TokenScores,
    agreement,
    gguf_token_check,
    instruct_sample,
    token_scores,
)
from finlora.methods import load_adapter
from finlora.methods.storage import TENSORS_FILE
from finlora.models import llama_cpp as llama_cpp_check
from finlora.models import load_base_model
from finlora.models.gguf_writer import TENSOR_TYPES, write_llama_gguf
from finlora.models.loading import MODEL_CLASSES, load_tokenizer
from finlora.runs import RunDir
from finlora.tasks.classify import LabelCodec
from finlora.tasks.instruct import InstructCodec

FORMATS = ("hf", "state_dict", "gguf")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Largest |logit difference| accepted between the written model and the adapter model, by the
# precision of the written weights: f32 differs only by the rounding of W0 + B·A.
TOLERANCES = {"f32": 1e-2, "f16": 0.5, "bf16": 2.0}
# Methods that add virtual tokens to the input instead of an update to a weight matrix.
UNMERGEABLE = {
    "PREFIX_TUNING": "prefix tuning",
    "PROMPT_TUNING": "prompt tuning",
    "P_TUNING": "P-tuning",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
    "ADAPTION_PROMPT": "adaption prompt",
}


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
        if self.task == "instruct":
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
                f"max |{scored} log-likelihood diff| {v.gguf_max_abs_loglik_diff:.3g}"
            )
        elif v.gguf_note:
            lines.append(v.gguf_note)
        return lines


@dataclass
class _Context:
    """A run loaded for export: its config, the adapter model, and what verification needs."""

    run: RunDir
    cfg: RunConfig
    method: str
    kind: str
    model: Any  # the PEFT model; merged in place by merge_and_unload
    tokenizer: Any
    codec: Any  # LabelCodec (classify) or InstructCodec (instruct)
    base_name: str
    gguf_sources: list[str]
    split: dict[str, Any]  # split.json: labels, data files and their sha256, test rows
    # Freeze / full runs: the base weights as loaded, before the tuned ones replaced them.
    base_state: dict[str, torch.Tensor] | None = None


# ---- checks before any work ---------------------------------------------------------------------


# Methods that store the tuned weights themselves: "merging" is loading them into the base.
WEIGHT_METHODS = {"freeze": "FREEZE", "full": "FULL"}


def _peft_type(run: RunDir) -> str:
    path = run.adapter / "adapter_config.json"
    if not path.is_file():
        method = run.read_json(run.adapter / "finlora_method.json").get("method", "?")
        if method not in WEIGHT_METHODS:
            raise FinloraError(f"{run.root}: method {method!r} has no adapter finlora can export")
        return WEIGHT_METHODS[method]
    return str(run.read_json(path).get("peft_type", "LORA")).upper()


def check_mergeable(run: RunDir) -> str:
    """The run's PEFT method; FinloraError for one that has no weight update to merge."""
    peft_type = _peft_type(run)
    if peft_type in UNMERGEABLE:
        raise FinloraError(
            f"{run.root}: {UNMERGEABLE[peft_type]} cannot be merged into the model's weights "
            "(it adds learned virtual tokens to the input, not a weight update); its adapter "
            "stays usable with `finlora predict` and `finlora eval`"
        )
    return peft_type


def check_adapter_not_empty(run: RunDir) -> None:
    """Refuse an adapter whose update is all zeros (untrained, or saved empty)."""
    path = run.adapter / "adapter_model.safetensors"
    if not path.is_file():
        path = run.adapter / TENSORS_FILE  # freeze / full: the tuned weights themselves
    if not path.is_file():
        raise FinloraError(f"{run.adapter}: no adapter weights (adapter_model.safetensors)")
    with safe_open(str(path), framework="pt") as fh:
        names = list(fh.keys())
        # LoRA starts B at zero, so a zero B means no update whatever A holds.
        watched = [n for n in names if "lora_B" in n] or names
        if not watched:
            raise FinloraError(f"{path}: the adapter holds no tensors")
        if all(not fh.get_tensor(n).any() for n in watched):
            raise FinloraError(
                f"{path}: all {len(watched)} adapter tensors ({watched[0]}, ...) are zero; "
                "the adapter holds no update and a merge would export the base model unchanged"
            )


def check_gguf_kind(run: RunDir) -> None:
    """Refuse GGUF for a run of a seq2seq or encoder model, from the kind its manifest records
    (before the model loads). A run without one meets the GGUF writer's own architecture check."""
    kind = _manifest(run).get("base_model", {}).get("kind", "causal")
    if kind != "causal":
        raise FinloraError(
            f"GGUF export covers causal (Llama) models; export {kind} models with --format hf"
        )


# ---- loading ------------------------------------------------------------------------------------


def _load(run: RunDir, method: str) -> _Context:
    """The run's adapter model in fp32 on the CPU: no bf16 weights, no autocast, exact merges."""
    cfg = run.read_config()
    split = run.read_split()
    kind = getattr(cfg.model, "kind", "auto")
    base = load_base_model(
        cfg.model.name,
        cfg.model.trust_remote_code,
        "eager",
        **({} if kind == "auto" else {"kind": kind}),
        labels=split["labels"],  # an encoder's head: one logit per label
    )
    tokenizer = load_tokenizer(run.tokenizer, cfg.model.trust_remote_code)
    base_state = None
    if method in WEIGHT_METHODS.values():
        # Loading freeze / full weights overwrites the base in place: keep a copy to compare.
        base_state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    model = load_adapter(base.model, cfg, base.kind, run.adapter).eval()
    model.requires_grad_(False)
    codec: Any
    if cfg.task == "instruct":
        codec = InstructCodec.for_data(tokenizer, cfg.data, base.kind)
    else:
        codec = LabelCodec.for_data(tokenizer, cfg.data, split["labels"], base.kind)
    sources = [p for p in base.weights_sha256 if p.lower().endswith(".gguf")]
    return _Context(
        run,
        cfg,
        method,
        base.kind,
        model,
        tokenizer,
        codec,
        cfg.model.name,
        sources,
        split,
        base_state,
    )


# ---- the merge ----------------------------------------------------------------------------------


def _merge(ctx: _Context, dtype: str) -> tuple[Any, int, int]:
    """Merge in place; returns the plain model and (changed, total) tensor counts at `dtype`."""
    target = DTYPES[dtype]
    if ctx.base_state is not None:  # freeze / full: the model already holds the tuned weights
        base_state = {k: v.to(target) for k, v in ctx.base_state.items()}
        merged = ctx.model
    else:
        base_state = {
            k: v.detach().to(target, copy=True) for k, v in _base_state(ctx.model).items()
        }
        merged = ctx.model.merge_and_unload()
    state = merged.state_dict()
    changed = sum(
        not torch.equal(state[k].to(target), base_state[k]) for k in state if k in base_state
    )
    if changed == 0:
        raise FinloraError(
            f"{ctx.run.root}: the merge left every weight equal to the base model's in {dtype} "
            "(the update is zero or below that precision); nothing exported"
        )
    return merged, changed, len(state)


def _base_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The base model's weights, named as after merge_and_unload, read under the adapter."""
    state = peft_model.get_base_model().state_dict()
    # Under PEFT a wrapped layer's weight is named `...q_proj.base_layer.weight`, and an
    # encoder's trained head keeps its starting copy as `classifier.original_module.weight`.
    return {
        k.replace(".base_layer.", ".").replace(".original_module.", "."): v
        for k, v in state.items()
        if "lora_" not in k and ".modules_to_save." not in k
    }


# ---- writers ------------------------------------------------------------------------------------


def _write_hf(ctx: _Context, merged: Any, tmp: Path, options: ExportOptions) -> list[str]:
    merged.to(DTYPES[options.weights_dtype])
    merged.save_pretrained(tmp, safe_serialization=True)
    ctx.tokenizer.save_pretrained(tmp)
    return sorted([*(p.name for p in tmp.iterdir()), "README.md"])  # the card comes last


def _write_state_dict(ctx: _Context, merged: Any, tmp: Path, options: ExportOptions) -> list[str]:
    target = DTYPES[options.weights_dtype]
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in merged.state_dict().items():
        # A tied head shares the embedding's storage; safetensors stores each storage once.
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to(target).contiguous()
    meta = {"format": "pt", "finlora_run": str(ctx.run.root), "base_model": ctx.base_name}
    save_file(tensors, str(tmp / "model.safetensors"), metadata=meta)
    return ["model.safetensors"]


def _write_gguf(ctx: _Context, merged: Any, tmp: Path, options: ExportOptions) -> list[str]:
    name = f"{ctx.run.root.name}-{options.tensor_type}.gguf"
    write_llama_gguf(
        merged,
        ctx.tokenizer,
        tmp / name,
        options.tensor_type,
        name=f"{ctx.base_name} + finlora {ctx.method.lower()} ({ctx.run.root.name})",
        pre=_source_pre(ctx),
        description=f"finlora: {ctx.method} merged; {_what_it_does(ctx)}",
    )
    return [name]


def _what_it_does(ctx: _Context) -> str:
    if ctx.cfg.task == "instruct":
        return f"instruction-tuned, {ctx.codec.template.name} template"
    return f"labels {', '.join(ctx.codec.labels)}"


def _source_pre(ctx: _Context) -> str | None:
    """The pre-tokenizer name in the GGUF the base model came from, if it came from one.

    llama.cpp's own converter chose it for this vocabulary, so it is the most faithful choice.
    """
    from gguf import GGUFReader

    for source in ctx.gguf_sources:
        field = GGUFReader(source).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return None


WRITERS: dict[str, Callable[[_Context, Any, Path, ExportOptions], list[str]]] = {
    "hf": _write_hf,
    "state_dict": _write_state_dict,
    "gguf": _write_gguf,
}


# ---- reloading what was written -----------------------------------------------------------------


def _reload_hf(ctx: _Context, tmp: Path, merged: Any) -> Any:
    cls = MODEL_CLASSES[ctx.kind]
    return cls.from_pretrained(tmp, dtype=torch.float32, local_files_only=True).eval()


def _reload_state_dict(ctx: _Context, tmp: Path, merged: Any) -> Any:
    from safetensors.torch import load_file

    model = MODEL_CLASSES[ctx.kind].from_config(merged.config, dtype=torch.float32)
    state = {k: v.float() for k, v in load_file(str(tmp / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise FinloraError(f"state_dict export: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def _reload_gguf(ctx: _Context, tmp: Path, merged: Any) -> Any:
    # The Hugging Face side of a GGUF export is the merged model itself (kept in fp32).
    return merged.float().eval()


RELOADERS: dict[str, Callable[[_Context, Path, Any], Any]] = {
    "hf": _reload_hf,
    "state_dict": _reload_state_dict,
    "gguf": _reload_gguf,
}


# ---- verification -------------------------------------------------------------------------------


def _verify_written(check: _Check, reference: Any, written: Any, v: Verification) -> None:
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
# tensors are misnamed or laid out wrong scores near chance, or gives the majority label (60% of
# FPB) throughout, instead.
GGUF_AGREEMENT_FLOORS = {"f32": 0.9, "f16": 0.9, "bf16": 0.9, "q8_0": 0.9}
GGUF_AGREEMENT_FLOOR_FEWER_BITS = 0.75  # q5_*, q4_*


def _verify_gguf(
    check: _Check, path: Path, reference: Any, v: Verification, tensor_type: str
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
    floor = GGUF_AGREEMENT_FLOORS.get(tensor_type, GGUF_AGREEMENT_FLOOR_FEWER_BITS)
    if found.agreement < floor:
        raise FinloraError(
            f"verification failed: in llama.cpp the {tensor_type} GGUF gives the adapter model's "
            f"{check.agreeing} on only {found.agreement:.1%} of {check.n} {check.unit} (at least "
            f"{floor:.0%} expected; tokenization equal on {found.tokens_equal:.1%}); nothing "
            "written (--no-verify writes it unchecked)"
        )


# ---- the checks, by task ------------------------------------------------------------------------


class _LabelCheck:
    """Classification: label scores on the run's test sentences."""

    unit = "sentences"
    agreeing = "labels"

    def __init__(self, ctx: _Context, n: int | None) -> None:
        self.ctx = ctx
        self.sample = label_sample(ctx.split, ctx.cfg, ctx.codec, n)
        self.description = self.sample.description
        self.n = len(self.sample.texts)
        self.prompts = [ctx.codec.encode_text(t) for t in self.sample.texts]

    def scores(self, model: Any) -> LabelScores:
        return label_scores(model, self.ctx.codec, self.prompts)

    def compare(self, reference: LabelScores, candidate: LabelScores, v: Verification) -> None:
        v.max_abs_logit_diff, v.label_agreement = compare_scores(reference, candidate)
        v.accuracy = accuracy(candidate.labels, self.sample.gold)

    def gguf(self, path: Path, reference: LabelScores) -> llama_cpp_check.Agreement:
        return gguf_label_check(path, self.ctx.codec, self.sample, reference)


class _AnswerCheck:
    """Instruct: the logits at the answer tokens of the run's test records, teacher-forced."""

    unit = "records"
    agreeing = "next tokens"

    def __init__(self, ctx: _Context, n: int | None) -> None:
        self.ctx = ctx
        self.sample: InstructSample = instruct_sample(ctx.split, ctx.cfg, ctx.codec, n)
        if not self.sample.features:
            raise FinloraError(f"{ctx.run.root}: no record to verify the export on")
        self.description = self.sample.description
        self.n = len(self.sample.features)

    def scores(self, model: Any) -> TokenScores:
        return token_scores(model, self.ctx.codec, self.sample)

    def compare(self, reference: TokenScores, candidate: TokenScores, v: Verification) -> None:
        pairs = zip(reference.logits, candidate.logits, strict=True)
        v.max_abs_logit_diff = max(float((a - b).abs().max()) for a, b in pairs)
        v.token_agreement = agreement(reference.predicted, candidate.predicted)
        v.answer_tokens = self.sample.tokens

    def gguf(self, path: Path, reference: TokenScores) -> llama_cpp_check.Agreement:
        return gguf_token_check(path, self.ctx.codec, self.sample, reference)


class _Check(Protocol):
    """What export_run needs of a task's check; the scores' type is the check's own."""

    unit: str  # what n counts
    agreeing: str  # what the agreement counts
    description: str  # where the sample came from
    n: int

    def scores(self, model: Any) -> Any: ...
    def compare(self, reference: Any, candidate: Any, v: Verification) -> None: ...
    def gguf(self, path: Path, reference: Any) -> llama_cpp_check.Agreement: ...


CHECKS: dict[str, Callable[[_Context, int | None], _Check]] = {
    "classify": _LabelCheck,
    "instruct": _AnswerCheck,
}


EXPORT_RECORD = "finlora_export.json"


def check_out(run: RunDir, out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that would swallow the run, one that --overwrite
    would take from something other than an earlier export, or one that cannot be written."""
    root, target = run.root.resolve(), out.resolve()
    if target == root or root.is_relative_to(target):
        raise FinloraError(f"--out {out}: would replace the run {run.root}; name another folder")
    atomic.check_new_dir(out, overwrite)
    if overwrite and out.is_dir() and any(out.iterdir()) and not (out / EXPORT_RECORD).is_file():
        raise FinloraError(
            f"{out}: holds no {EXPORT_RECORD}, so it is no finlora export and --overwrite "
            "leaves it alone (remove it yourself or name another folder)"
        )
    atomic.check_can_create(out)


def export_run(
    run_dir: Path, options: ExportOptions, log: Callable[[str], None] | None = None
) -> ExportResult:
    """Merge RUN_DIR's adapter, write it as `options.format` to `options.out`, verify it.

    Raises FinloraError for a missing or unmergeable run, an all-zero adapter, a merge that
    changes nothing, an existing non-empty --out, or a failed verification; on any error
    nothing is left at --out.
    """
    say = log or (lambda _msg: None)
    run = RunDir(Path(run_dir))
    run.require_trained()
    method = check_mergeable(run)
    check_out(run, options.out, options.overwrite)
    check_adapter_not_empty(run)
    if options.format == "gguf":
        check_gguf_kind(run)
    say(f"loading {run.root} ...")
    ctx = _load(run, method)
    v = Verification()
    check = CHECKS[ctx.cfg.task](ctx, options.verify_n)
    v.data = check.description
    reference = check.scores(ctx.model) if options.verify else None
    merged, v.changed_tensors, v.tensors = _merge(ctx, options.weights_dtype)
    say(f"merged {ctx.method}: {v.changed_tensors} of {v.tensors} tensors changed")
    with atomic.atomic_dir(options.out) as tmp:
        files = WRITERS[options.format](ctx, merged, tmp, options)
        if reference is not None:
            v.n = check.n
            v.tolerance = options.tolerance or TOLERANCES[_checked_dtype(options)]
            say(f"verifying on {v.n} {check.unit} ({v.data}) ...")
            written = RELOADERS[options.format](ctx, tmp, merged)
            _verify_written(check, reference, written, v)
            if options.format == "gguf":
                _verify_gguf(check, tmp / files[0], reference, v, options.tensor_type)
        if options.format == "hf":
            # Written after the verification, whose figures it quotes.
            atomic.write_text(tmp / "README.md", _model_card(ctx, options, v))
        atomic.write_json(tmp / EXPORT_RECORD, _record(ctx, options, files, v))
    files.append(EXPORT_RECORD)
    return ExportResult(
        ctx.cfg.task,
        options.format,
        options.out,
        sorted(files),
        ctx.cfg.method.name,
        options.tensor_type if options.format == "gguf" else options.weights_dtype,
        reference is not None,
        v,
    )


def _checked_dtype(options: ExportOptions) -> str:
    # A GGUF's Hugging Face check runs on the fp32 merged model; its own precision is llama.cpp's.
    return "f32" if options.format == "gguf" else options.weights_dtype


# ---- records ------------------------------------------------------------------------------------


def _manifest(run: RunDir) -> dict[str, Any]:
    return run.read_json(run.manifest) if run.manifest.is_file() else {}


def _test_metrics(ctx: _Context) -> dict[str, Any] | None:
    path = ctx.run.eval_dir / "test.json"
    metrics = ctx.run.read_json(path) if path.is_file() else None
    # Before eval named its --data reports apart, a file called test.csv wrote this one.
    if not isinstance(metrics, dict) or not str(metrics.get("data", "")).startswith("test split"):
        return None
    return metrics


def _record(ctx: _Context, options: ExportOptions, files: list[str], v: Verification) -> Any:
    return {
        "finlora_export": 1,
        "run": str(ctx.run.root),
        "format": options.format,
        "dtype": options.tensor_type if options.format == "gguf" else options.weights_dtype,
        "files": files,
        "method": ctx.cfg.method.name,
        "task": ctx.cfg.task,
        **_prompt_record(ctx),
        "verification": asdict(v),
        "manifest": _manifest(ctx.run),
    }


def _prompt_record(ctx: _Context) -> dict[str, Any]:
    """How to prompt the exported model: the label prompt, or the instruction template."""
    template = ctx.codec.template
    if ctx.kind == "encoder":  # no prompt: the sentence itself, one head logit per label
        return {"labels": ctx.codec.labels}
    if ctx.cfg.task == "classify":
        before, after = ctx.codec.prompt_ids
        return {
            "labels": ctx.codec.labels,
            "prompt": template.prompt,
            "label_prefix": template.label_prefix,
            # The text is tokenized on its own, between the ids of the prompt's two parts (each
            # tokenized alone, no special tokens): the whole prompt as one string can tokenize
            # differently where the text meets them.
            "prompt_ids": {"before_text": before, "after_text": after},
            "label_ids": ctx.codec.label_ids,
        }
    if template.is_chat:
        return {"template": "chat"}  # the tokenizer's own, written with the model
    return {
        "template": template.name,
        "prompt_input": template.prompt_input,
        "prompt_no_input": template.prompt_no_input,
    }


def _method_section(ctx: _Context) -> str:
    section = getattr(ctx.cfg, ctx.method.lower(), None)
    try:
        return json.dumps(asdict(section))  # type: ignore[arg-type]
    except TypeError:
        return "(see config.yaml of the run)"


def _model_card(ctx: _Context, options: ExportOptions, v: Verification) -> str:
    """README.md for the hf export: what it is, how it was made and scored, and how to use it."""
    manifest = _manifest(ctx.run)
    classify = ctx.cfg.task == "classify"
    # Only an encoder export is a pipeline("text-classification") model; a causal or seq2seq
    # classifier is a language model that writes the label word.
    encoder = ctx.kind == "encoder"
    tags = (
        f"financial-sentiment{', text-classification' if encoder else ''}"
        if classify
        else "instruction-tuning"
    )
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [finlora, {tags}]",
        "---",
        f"# {ctx.run.root.name}: {ctx.base_name} with a merged {ctx.method} adapter",
        "",
        f"Exported by `finlora export {ctx.run.root} --format hf` ({options.weights_dtype}).",
        "The adapter is added into the base weights, so this loads with plain transformers.",
        "",
        "## Method",
        "",
        f"- {ctx.method} on `{ctx.base_name}`; method settings: {_method_section(ctx)}",
        f"- seed {ctx.cfg.seed}, {manifest.get('steps', '?')} steps, "
        f"precision {manifest.get('precision', '?')}",
        "",
        "## Data",
        "",
        f"- {manifest.get('data', {}).get('description', ctx.cfg.data.path)}",
        *([f"- labels: {', '.join(ctx.codec.labels)}"] if classify else []),
        "",
        "## Metrics (the run's held-out test split)",
        "",
        _card_metrics(ctx),
        "",
        "## Use",
        "",
        *(_card_use_labels(ctx) if classify else _card_use_instructions(ctx)),
        "",
        "## Verification",
        "",
        _verification_line(v),
        "",
        "## Manifest",
        "",
        "```json",
        json.dumps(manifest, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _card_metrics(ctx: _Context) -> str:
    metrics = _test_metrics(ctx)
    if not metrics:
        return f"not measured yet (`finlora eval {ctx.run.root}`)"
    if metrics.get("task") == "instruct":
        return (
            f"perplexity {metrics['perplexity']:.3f}, BLEU {metrics['bleu']:.2f}, "
            f"ROUGE-L {metrics['rougeL']:.4f}, n {metrics['n']} ({metrics.get('data', '')})"
        )
    return (
        f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
        f"n {metrics['n']} ({metrics.get('data', '')})"
    )


def _card_use_labels(ctx: _Context) -> list[str]:
    if ctx.kind == "encoder":
        return [
            "A sequence classifier with one logit per label (`config.id2label`); it reads the",
            "bare sentence:",
            "",
            "```python",
            "from transformers import pipeline",
            "",
            'classify = pipeline("text-classification", model="path/to/this/directory")',
            'classify("Operating profit rose to EUR 13.1 mn from EUR 8.7 mn.")',
            "```",
        ]
    before, after = ctx.codec.template.parts(ctx.codec.labels)
    labels = ", ".join(f"`{ctx.codec.template.verbalize(label)}`" for label in ctx.codec.labels)
    return [
        "A sentence is classified by comparing the likelihood of each label's tokens after the",
        f"prompt `{json.dumps(before + '{text}' + after)}`; the label tokens are {labels}.",
        "Tokenize as finlora does, in three pieces, or the scores can shift slightly where the",
        "text meets the prompt:",
        "",
        "```python",
        "ids = (tokenizer(before, add_special_tokens=False).input_ids",
        "       + tokenizer(text, add_special_tokens=False).input_ids",
        "       + tokenizer(after, add_special_tokens=False).input_ids)",
        "```",
        "",
        "(`before` and `after` are the prompt's parts around `{text}`; their ids, and the",
        "labels', are `prompt_ids` and `label_ids` in `finlora_export.json`.)",
    ]


def _card_use_instructions(ctx: _Context) -> list[str]:
    template = ctx.codec.template
    if template.is_chat:
        return [
            "Trained on conversations rendered with the tokenizer's own chat template (saved",
            "with it): use `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.",
        ]
    return [
        f"Trained on the `{template.name}` prompt; an instruction with an input reads",
        "",
        "```text",
        template.prompt_input,
        "```",
        "",
        "and one without",
        "",
        "```text",
        template.prompt_no_input,
        "```",
    ]


def _verification_line(v: Verification) -> str:
    if v.max_abs_logit_diff is None:
        return "Not verified (exported with --no-verify)."
    if v.token_agreement is not None:
        return (
            f"On the {v.answer_tokens} answer tokens of {v.n} records ({v.data}), teacher-forced, "
            f"the exported weights give logits within {v.max_abs_logit_diff:.3g} of the adapter "
            f"model's (tolerance {v.tolerance:g}); the most likely next token agrees on "
            f"{v.token_agreement:.1%}."
        )
    line = (
        f"On {v.n} sentences ({v.data}) the exported weights give logits within "
        f"{v.max_abs_logit_diff:.3g} of the adapter model's (tolerance {v.tolerance:g}); "
        f"labels agree on {v.label_agreement:.1%}"
    )
    return line + (f", accuracy {v.accuracy:.4f}." if v.accuracy is not None else ".")
