"""Label prediction for new text with a trained run (or its base model, zero-shot)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finlora.config import RunConfig
from finlora.errors import FinloraError
from finlora.methods import load_adapter, merged_for_inference
from finlora.models import Placement, load_base_model
from finlora.models.fused_projections import fuse_projections
from finlora.models.loading import load_tokenizer, model_kind
from finlora.runs import RunDir
from finlora.scoring import predict_proba
from finlora.tasks.classify import LabelCodec
from finlora.tasks.instruct import InstructCodec


@dataclass
class Prediction:
    text: str
    label: str
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label, "probabilities": self.probabilities}


@dataclass
class LoadedRun:
    """A run directory brought back to life: its config, labels, model and codec (a label codec
    for classify runs, an instruction codec for instruct runs)."""

    run: RunDir
    cfg: RunConfig
    split: dict[str, Any]
    model: Any
    codec: Any  # LabelCodec or InstructCodec
    device: torch.device
    dtype: torch.dtype | None
    zero_shot: bool

    @property
    def labels(self) -> list[str]:
        return list(self.split["labels"])

    @property
    def task(self) -> str:
        return self.cfg.task

    def require_task(self, task: str, instead: str) -> None:
        _check_task(self.run.root, self.task, task, instead)

    def proba(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        """Label probabilities, (N, K) in `labels` order."""
        self.require_task("classify", "finlora generate or finlora chat")
        return predict_proba(
            self.model,
            self.codec,
            texts,
            batch_size=self.cfg.speed.eval_batch_size,
            device=self.device,
            dtype=self.dtype,
            fast=self.cfg.speed.label_logits_only,
            shared_prompt=self.cfg.speed.shared_prompt_scoring,
            trim_padding=self.cfg.speed.trim_padding,
            progress=progress,
        )

    def predict(self, texts: Sequence[str], progress: bool = True) -> list[Prediction]:
        if not texts:
            raise FinloraError("no text to predict")
        probs = self.proba(texts, progress)
        return [
            Prediction(
                text,
                self.labels[int(row.argmax())],
                {label: round(float(p), 6) for label, p in zip(self.labels, row, strict=True)},
            )
            for text, row in zip(texts, probs, strict=True)
        ]


def _check_task(root: Path, actual: str, wanted: str, instead: str) -> None:
    if actual != wanted:
        raise FinloraError(f"{root}: this run's task is {actual}, not {wanted} (use {instead})")


def require_task(run_dir: Path, task: str, instead: str) -> None:
    """Refuse a run of another task from its config alone, before any model is loaded."""
    run = RunDir(Path(run_dir))
    run.require_trained()
    _check_task(run.root, run.read_config().task, task, instead)


def load_run(run_dir: Path, zero_shot: bool = False) -> LoadedRun:
    """Load a finished run; with `zero_shot`, its base model without the adapter."""
    run = RunDir(Path(run_dir))
    run.require_trained()
    cfg = run.read_config()
    split = run.read_split()
    if zero_shot and model_kind(cfg.model.name, cfg.model.kind) == "encoder":
        raise FinloraError(
            f"{run.root}: an encoder's classification head is trained by the run, so its base "
            "model has no zero-shot answer (only a random head)"
        )
    placement = Placement.from_config(cfg.train, cfg.speed)
    base = load_base_model(
        cfg.model.name,
        cfg.model.trust_remote_code,
        placement.attention,
        kind=cfg.model.kind,
        labels=split["labels"],
    )
    tokenizer = load_tokenizer(run.tokenizer, cfg.model.trust_remote_code)
    model = base.model
    if not zero_shot:
        model = load_adapter(model, cfg, base.kind, run.adapter)
        if cfg.speed.merge_for_inference:
            model = merged_for_inference(model)
    model = placement.place(model).eval()
    if cfg.speed.fuse_projections:
        fuse_projections(model)
    codec: Any
    if cfg.task == "instruct":
        codec = InstructCodec.for_data(tokenizer, cfg.data, base.kind)
    else:
        codec = LabelCodec.for_data(tokenizer, cfg.data, split["labels"], base.kind)
    return LoadedRun(run, cfg, split, model, codec, placement.device, placement.dtype, zero_shot)
