"""A run loaded for export: the adapter model in fp32 on the CPU, and what verification needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finlora.config import RunConfig
from finlora.inference import load_base_of
from finlora.methods import load_adapter
from finlora.runs import Run
from finlora.tasks import Codec
from finlora.tasks.classify import LabelCodec
from finlora.tasks.instruct import InstructCodec

# Methods that store the tuned weights themselves: "merging" is loading them into the base.
WEIGHT_METHODS = {"freeze": "FREEZE", "full": "FULL"}


@dataclass
class ExportContext:
    """A run loaded for export: the opened run, the adapter model, and what verification needs."""

    run: Run
    method: str
    kind: str
    model: Any  # the PEFT model; merged in place by merge_and_unload
    tokenizer: Any
    codec: Codec
    base_name: str
    gguf_sources: list[str]
    # Freeze / full runs: the base weights as loaded, before the tuned ones replaced them.
    base_state: dict[str, torch.Tensor] | None = None

    @property
    def cfg(self) -> RunConfig:
        return self.run.config

    @property
    def label_codec(self) -> LabelCodec:
        assert isinstance(self.codec, LabelCodec), "a classification run's check"
        return self.codec

    @property
    def instruct_codec(self) -> InstructCodec:
        assert isinstance(self.codec, InstructCodec), "an instruct run's check"
        return self.codec


def load_context(run: Run, method: str, trust_remote_code: bool = False) -> ExportContext:
    """The run's adapter model in fp32 on the CPU: no bf16 weights, no autocast, exact merges."""
    base, codec = load_base_of(run, "eager", trust_remote_code)
    base_state = None
    if method in WEIGHT_METHODS.values():
        # Loading freeze / full weights overwrites the base in place: keep a copy to compare.
        base_state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    model = load_adapter(base.model, run.config, base.kind, run.dir.adapter).eval()
    model.requires_grad_(False)
    sources = [p for p in base.weights_sha256 if p.lower().endswith(".gguf")]
    return ExportContext(
        run,
        method,
        base.kind,
        model,
        base.tokenizer,
        codec,
        run.config.model.name,
        sources,
        base_state,
    )
