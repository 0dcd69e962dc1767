"""A run loaded for export: the adapter model in fp32 on the CPU, and what verification needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finlora.config import RunConfig
from finlora.methods import load_adapter
from finlora.models import load_base_model
from finlora.models.loading import load_tokenizer
from finlora.runs import RunDir
from finlora.tasks.classify import LabelCodec
from finlora.tasks.instruct import InstructCodec

# Methods that store the tuned weights themselves: "merging" is loading them into the base.
WEIGHT_METHODS = {"freeze": "FREEZE", "full": "FULL"}


@dataclass
class ExportContext:
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


def load_context(run: RunDir, method: str) -> ExportContext:
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
    return ExportContext(
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
