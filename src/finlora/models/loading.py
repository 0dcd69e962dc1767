"""Loading a base model and its tokenizer from a registered name, a local directory or a GGUF file.

Everything is offline: nothing is fetched from a hub. GGUF files are dequantized once and cached
as a Hugging Face safetensors checkpoint under $FINLORA_HOME (default ~/.cache/finlora), because
dequantizing takes ~20 s and a GGUF-loaded model cannot `save_pretrained` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from filelock import FileLock, Timeout  # a dependency of huggingface_hub, so of transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from finlora.atomic import atomic_dir, clean_leftovers, write_errors
from finlora.errors import FinloraError
from finlora.models import quantize as quant
from finlora.models.device import release_checkpoint_pages
from finlora.models.registry import EMBEDDED

log = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, Any] = {
    "causal": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
    "encoder": AutoModelForSequenceClassification,
}
# Architectures whose checkpoints are encoders that a classification head can sit on.
_ENCODER_HEADS = ("ForSequenceClassification", "ForMaskedLM", "ForTokenClassification")


@dataclass
class BaseModel:
    """A loaded base model with what a run must record about it."""

    model: PreTrainedModel
    tokenizer: Any
    kind: str  # "causal" | "seq2seq" | "encoder"
    name: str  # as the user gave it
    checkpoint_dir: Path  # the Hugging Face directory it was loaded from (a cache dir for GGUF)
    weights_sha256: dict[str, str] = field(default_factory=dict)  # original weights file -> sha256


def finlora_home() -> Path:
    return Path(os.environ.get("FINLORA_HOME") or Path.home() / ".cache" / "finlora")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_unchanged(recorded: dict[str, str]) -> bool:
    """Whether every file of a `{path: sha256}` record is still there with that content."""
    return all(Path(f).is_file() and sha256_file(Path(f)) == d for f, d in recorded.items())


def _hub_hint(name: str) -> str:
    # A path (a hub name is ORG/NAME, never /..., ./..., ~/... or a .gguf file) that is absent.
    if name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf"):
        return f"{name}: no such model directory or file"
    return (
        f"model '{name}' is not a registered name (see `finlora models`), a local model "
        "directory or a .gguf file; finlora works offline: copy the model to this machine "
        "(e.g. `huggingface-cli download ORG/NAME --local-dir DIR` where a hub is reachable) "
        "and set model.name=DIR"
    )


def _gguf_cache_dir(gguf: Path, digest: str) -> Path:
    stem = gguf.stem.lower().replace(".", "-")
    return finlora_home() / "models" / f"{stem}-{digest[:16]}"


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold the lock file beside the cache entry `target` (`NAME.lock`), waiting for another
    process that holds it."""
    lock = FileLock(target.with_name(f"{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process converting into %s ...", target)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def convert_gguf(gguf: Path, digest: str) -> Path:
    """Dequantize `gguf` into a cached Hugging Face checkpoint and return its directory.

    The checkpoint is built in a temporary directory beside the cache entry and renamed into
    place, so a killed conversion never leaves a half-written cache behind. Processes that
    convert the same file at once (runs started together, `--nproc`) take turns under a file
    lock: the first converts, the others find its cache. Raises FinloraError for a file that
    is no GGUF model, or a cache that cannot be written (naming it).
    """
    target = _gguf_cache_dir(gguf, digest)
    if (target / "config.json").is_file():
        return target
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with _conversion_lock(target):
            if not (target / "config.json").is_file():
                clean_leftovers(target.parent, target.name)  # of conversions killed mid-way
                _convert_gguf(gguf, digest, target)
    return target


def _convert_gguf(gguf: Path, digest: str, target: Path) -> None:
    log.info("converting %s to a Hugging Face checkpoint (once) ...", gguf.name)
    with atomic_dir(target, replace=False) as tmp:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            raise FinloraError(f"{gguf}: not a GGUF model transformers can read ({exc})") from None
        config = loaded.config
        # The GGUF loader marks the model quantized, which blocks save_pretrained; the
        # tensors are already dequantized, so rebuild a plain model from config + state dict.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\nsha256 {digest}\n", encoding="utf-8")


def _class_names(mapping: Mapping[str, Any]) -> set[str]:
    """The model class names of one of transformers' auto mappings (model type -> class)."""
    return {n for names in mapping.values() for n in ([names] if isinstance(names, str) else names)}


def config_kind(config: Any, where: Path) -> str:
    """causal, seq2seq or encoder, from the config's saved architecture (its class name)."""
    from transformers.models.auto import modeling_auto

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = getattr(config, "architectures", None) or []
    # Older causal LMs are named *LMHeadModel (GPT2LMHeadModel), hence the mapping.
    causal = _class_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if any(a.endswith("ForCausalLM") or a in causal for a in architectures) or not architectures:
        return "causal"
    if any(a.endswith(_ENCODER_HEADS) for a in architectures):
        return "encoder"
    # A bare encoder (BertModel, as sentence-embedding models are saved): a classifier to be.
    if getattr(config, "model_type", None) in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    raise FinloraError(
        f"{where}: cannot tell what kind of model architecture {architectures[0]} is "
        "(set model.kind to causal, seq2seq or encoder)"
    )


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FinloraError(f"{path}: not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise FinloraError(
                f"{path}: only pickle weights (.bin/.pt) found; finlora loads safetensors only "
                "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
            )
        raise FinloraError(f"{path}: no *.safetensors weights in the model directory")


def resolve(name: str) -> tuple[Path, dict[str, str]]:
    """Map a model name to a Hugging Face directory, converting GGUF where needed.

    Returns the directory and the sha256 of the original weights files.
    """
    if name in EMBEDDED:
        located = EMBEDDED[name].locate()
        if located.is_dir():
            return located, {str(p): sha256_file(p) for p in sorted(located.glob("*.safetensors"))}
        gguf = located
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise FinloraError(_hub_hint(name))
        if path.is_dir():
            _check_model_dir(path)
            shas = {str(p): sha256_file(p) for p in sorted(path.glob("*.safetensors"))}
            return path, shas
        if path.suffix.lower() != ".gguf":
            raise FinloraError(f"{path}: not a model (expected a model directory or a .gguf file)")
        gguf = path
    digest = sha256_file(gguf)
    return convert_gguf(gguf, digest), {str(gguf): digest}


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def check_remote_code(directory: Path, trust_remote_code: bool) -> None:
    """Refuse a model or tokenizer directory that maps a class to its own Python file
    (`auto_map`) unless the command was given --trust-remote-code: loading it runs that file.
    Asked here, before transformers, so that the refusal is one line that says what to do."""
    if trust_remote_code:
        return
    for name in REMOTE_CODE_FILES:
        try:
            data = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise FinloraError(
                f"{directory}: {name} maps to the model's own Python code (auto_map), which "
                "finlora runs only when the command is given --trust-remote-code (do so only "
                "if you trust where this model or run came from)"
            )


def load_tokenizer(directory: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in `directory`; raises FinloraError when there is none to read, or
    when it needs its own code and `trust_remote_code` is off."""
    check_remote_code(directory, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        # transformers reads a directory without tokenizer files as a hub repo id, or fails
        # deep in a backend: neither names the directory's real problem.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinloraError(
            f"{directory}: no usable tokenizer (tokenizer.json or tokenizer_config.json and "
            f"its vocabulary; {reason[:160]})"
        ) from None
    if tokenizer.pad_token_id is None:
        # Causal LMs often ship without a pad token; padding is masked out, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _head_options(kind: str, labels: Sequence[str] | None, name: str) -> dict[str, Any]:
    """from_pretrained arguments for an encoder's classification head: one logit per label."""
    if kind != "encoder":
        return {}
    if not labels:
        raise FinloraError(f"model '{name}' is an encoder classifier: it needs the label set")
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        # A checkpoint fine-tuned on another label set gets a fresh head of the right size.
        "ignore_mismatched_sizes": True,
    }


def _read_config(directory: Path, trust_remote_code: bool) -> Any:
    check_remote_code(directory, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(
            directory, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (ValueError, OSError) as exc:
        raise FinloraError(f"{directory}: not a model transformers can read ({exc})") from None


def model_config(name: str, trust_remote_code: bool = False) -> tuple[Any, Path]:
    """The config `load_base_model` would load `name` with, and the directory it came from,
    without reading a directory's weights (or hashing them): for checks worth making before
    loading. A .gguf file (the embedded model's too) is converted once, then cached."""
    path = Path(name).expanduser()
    if name not in EMBEDDED and path.is_dir():
        _check_model_dir(path)
        return _read_config(path, trust_remote_code), path
    directory, _ = resolve(name)
    return _read_config(directory, trust_remote_code), directory


def model_kind(name: str, kind: str = "auto", trust_remote_code: bool = False) -> str:
    """What `load_base_model` would load `name` as (causal, seq2seq, encoder), from its config
    alone (see model_config)."""
    if kind != "auto":
        return kind
    if name in EMBEDDED:
        return EMBEDDED[name].kind
    return config_kind(*model_config(name, trust_remote_code))


def load_base_model(
    name: str,
    trust_remote_code: bool = False,
    attention: str | None = None,
    *,
    kind: str = "auto",
    labels: Sequence[str] | None = None,
    tokenizer: Any | None = None,
    quantize: str | None = None,
) -> BaseModel:
    """Load base model and tokenizer, fp32, on the CPU. Raises FinloraError for a non-model.

    `tokenizer`: one already loaded (a trained run's own), used instead of the model's.

    `attention` picks the attention kernel ("eager", "sdpa"); None keeps the model's default.
    `kind` ("auto" reads the model's config) picks causal, seq2seq or encoder; an encoder gets
    a new classification head with one output per entry of `labels`, initialised from torch's
    current random state (seed it first for a reproducible head).
    `quantize` ("4bit", "8bit") loads the linear layers quantized (models/quantize.py), from
    the Hugging Face directory (a GGUF's cached conversion too).
    """
    directory, shas = resolve(name)
    config = _read_config(directory, trust_remote_code)
    if kind == "auto":
        kind = EMBEDDED[name].kind if name in EMBEDDED else config_kind(config, directory)
    transformers.logging.set_verbosity_error()
    try:
        model = MODEL_CLASSES[kind].from_pretrained(
            directory,
            dtype=torch.float32,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **({"attn_implementation": attention} if attention else {}),
            **_head_options(kind, labels, name),
            **quant.load_options(quantize, kind),
        )
    except ValueError as exc:
        # transformers says "Unrecognized configuration class ..." for a kind the model lacks.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinloraError(f"{directory}: cannot load as a {kind} model ({reason})") from None
    if quantize is not None:
        quant.keep_canonical_layout(model)
        # Quantizing read every page of the fp32 file, which stays resident while the fp32
        # tensors left (embeddings, norms) are views into its memory map.
        release_checkpoint_pages(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(directory, trust_remote_code)
    return BaseModel(model, tokenizer, kind, name, directory, shas)
