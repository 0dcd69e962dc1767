"""Writers (hf, state_dict, gguf) and the reloaders that read each written model back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from finlora.errors import FinloraError
from finlora.export.gguf_writer import write_llama_gguf
from finlora.export.load import ExportContext
from finlora.export.options import DTYPES, ExportOptions
from finlora.models.loading import MODEL_CLASSES


def _write_hf(ctx: ExportContext, merged: Any, tmp: Path, options: ExportOptions) -> list[str]:
    merged.to(DTYPES[options.weights_dtype])
    merged.save_pretrained(tmp, safe_serialization=True)
    ctx.tokenizer.save_pretrained(tmp)
    return sorted(p.name for p in tmp.iterdir())


def _write_state_dict(
    ctx: ExportContext, merged: Any, tmp: Path, options: ExportOptions
) -> list[str]:
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


def _write_gguf(ctx: ExportContext, merged: Any, tmp: Path, options: ExportOptions) -> list[str]:
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


def _what_it_does(ctx: ExportContext) -> str:
    if ctx.cfg.task != "classify":
        tuned = "preference-tuned" if ctx.cfg.task == "preference" else "instruction-tuned"
        return f"{tuned}, {ctx.instruct_codec.template.name} template"
    return f"labels {', '.join(ctx.label_codec.labels)}"


def _source_pre(ctx: ExportContext) -> str | None:
    """The pre-tokenizer name in the GGUF the base model came from, if it came from one.

    llama.cpp's own converter chose it for this vocabulary, so it is the most faithful choice.
    """
    from gguf import GGUFReader

    for source in ctx.gguf_sources:
        field = GGUFReader(source).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return None


WRITERS: dict[str, Callable[[ExportContext, Any, Path, ExportOptions], list[str]]] = {
    "hf": _write_hf,
    "state_dict": _write_state_dict,
    "gguf": _write_gguf,
}


# Each writer's output read back as a model, for the verification to score.


def _reload_hf(ctx: ExportContext, tmp: Path, merged: Any) -> Any:
    cls = MODEL_CLASSES[ctx.kind]
    return cls.from_pretrained(tmp, dtype=torch.float32, local_files_only=True).eval()


def _reload_state_dict(ctx: ExportContext, tmp: Path, merged: Any) -> Any:
    from safetensors.torch import load_file

    model = MODEL_CLASSES[ctx.kind].from_config(merged.config, dtype=torch.float32)
    state = {k: v.float() for k, v in load_file(str(tmp / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise FinloraError(f"state_dict export: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def _reload_gguf(ctx: ExportContext, tmp: Path, merged: Any) -> Any:
    # The Hugging Face side of a GGUF export is the merged model itself (kept in fp32).
    return merged.float().eval()


RELOADERS: dict[str, Callable[[ExportContext, Path, Any], Any]] = {
    "hf": _reload_hf,
    "state_dict": _reload_state_dict,
    "gguf": _reload_gguf,
}
