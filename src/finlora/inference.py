"""The one way from a run directory to a scoring model: predict, eval, analyze, generate, chat,
serve, export and bench all open a trained run through `load_run`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finlora.calibration import calibrated
from finlora.config import SERVES_AS, RunConfig, with_speed_overrides
from finlora.errors import FinloraError
from finlora.methods import load_adapter, merged_for_inference
from finlora.models import BaseModel, Placement, load_base_model
from finlora.models.fast.fused_projections import fuse_projections
from finlora.models.loading import load_tokenizer, model_kind
from finlora.runs import Run
from finlora.scoring import predict_proba
from finlora.tasks import Codec, codec_for
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
    """A run directory brought back to life: the opened run, its model and codec."""

    run: Run
    model: Any  # a transformers model, with the adapter unless zero_shot
    codec: Codec
    device: torch.device
    dtype: torch.dtype | None
    zero_shot: bool
    # What the label scores are divided by before their softmax: the run's calibration, read
    # once here (1.0 for the base model, or a run without one).
    temperature: float = 1.0

    @property
    def cfg(self) -> RunConfig:
        return self.run.config

    @property
    def labels(self) -> list[str]:
        return self.run.labels

    @property
    def task(self) -> str:
        """The task the run answers as (`SERVES_AS`): a preference run answers as instruct."""
        return SERVES_AS[self.run.task]

    @property
    def label_codec(self) -> LabelCodec:
        """The codec of a classification run; refuses any other task."""
        self.require_task("classify", "finlora generate or finlora chat")
        assert isinstance(self.codec, LabelCodec)
        return self.codec

    @property
    def instruct_codec(self) -> InstructCodec:
        """The codec of an instruct run; refuses any other task."""
        self.require_task("instruct", "finlora predict")
        assert isinstance(self.codec, InstructCodec)
        return self.codec

    def require_task(self, task: str, instead: str) -> None:
        _check_task(self.run.root, self.task, task, instead)

    def proba(
        self, texts: Sequence[str], progress: bool = True, calibrate: bool = True
    ) -> np.ndarray:
        """Label probabilities, (N, K) in `labels` order; calibrated by the run's temperature
        unless `calibrate` is off (the argmax is the same either way)."""
        probs = self._proba(texts, progress)
        return calibrated(probs, self.temperature) if calibrate else probs

    def _proba(self, texts: Sequence[str], progress: bool) -> np.ndarray:
        speed = self.cfg.speed
        return predict_proba(
            self.model,
            self.label_codec,
            texts,
            batch_size=speed.eval_batch_size,
            device=self.device,
            dtype=self.dtype,
            fast=speed.label_logits_only,
            shared_prompt=speed.shared_prompt_scoring,
            trim_padding=speed.trim_padding,
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
    if SERVES_AS.get(actual, actual) != wanted:
        raise FinloraError(f"{root}: this run's task is {actual}, not {wanted} (use {instead})")


def require_task(run_dir: Path, task: str, instead: str, speed: Sequence[str] = ()) -> Run:
    """Open a finished run (with `--set speed.x=...` items) and refuse one of another task,
    before any model is loaded; `load_run` takes the run it returns."""
    run = open_run(run_dir, speed)
    _check_task(run.root, run.task, task, instead)
    return run


def open_run(run_dir: Path, speed: Sequence[str] = ()) -> Run:
    """Open a finished run, with `--set speed.x=...` items applied to its config."""
    run = Run.open(Path(run_dir))
    if speed:
        run = dataclasses.replace(run, config=with_speed_overrides(run.config, list(speed)))
    return run


def load_run(
    run_dir: Path | Run,
    zero_shot: bool = False,
    *,
    trust_remote_code: bool = False,
    speed: Sequence[str] = (),
) -> LoadedRun:
    """Load a finished run for scoring; with `zero_shot`, its base model without the adapter.

    `trust_remote_code` comes from the command line only (never from the run's files): a run
    whose model or tokenizer maps to its own code is refused without it. `speed` holds
    `--set speed.x=value` items for this load. Raises FinloraError on a bad or foreign run.
    """
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir, speed)
    cfg = run.config
    if zero_shot and model_kind(cfg.model.name, cfg.model.kind, trust_remote_code) == "encoder":
        raise FinloraError(
            f"{run.root}: an encoder's classification head is trained by the run, so its base "
            "model has no zero-shot answer (only a random head)"
        )
    placement = Placement.from_config(cfg.train, cfg.speed)
    base, codec = load_base_of(run, placement.attention, trust_remote_code)
    model = base.model
    if not zero_shot:
        model = load_adapter(model, cfg, base.kind, run.dir.adapter)
        if cfg.speed.merge_for_inference:
            model = merged_for_inference(model)
    model = placement.place(model).eval()
    if cfg.speed.fuse_projections:
        fuse_projections(model)
    calibration = None if zero_shot else run.calibration()
    temperature = calibration.temperature if calibration is not None else 1.0
    return LoadedRun(run, model, codec, placement.device, placement.dtype, zero_shot, temperature)


def load_base_of(
    run: Run, attention: str | None, trust_remote_code: bool = False
) -> tuple[BaseModel, Codec]:
    """A run's base model (not placed, no adapter; its `tokenizer` the run's own) and its
    task's codec. The run's tokenizer is read first: a run that needs its own code is refused
    before any weight is loaded."""
    cfg = run.config
    tokenizer = load_tokenizer(run.dir.tokenizer, trust_remote_code)
    base = load_base_model(
        cfg.model.name,
        trust_remote_code,
        attention,
        kind=cfg.model.kind,
        labels=run.labels,
        tokenizer=tokenizer,
        quantize=cfg.model.quantize,
    )
    task = SERVES_AS[cfg.task]  # a preference run's prompts are an instruct run's
    return base, codec_for(task, tokenizer, cfg.data, run.labels, base.kind)
