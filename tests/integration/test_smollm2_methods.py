"""Every tuning method and LoRA option on the real embedded SmolLM2-135M: two steps on the
synthetic set, then the reloaded run scores exactly as the in-memory model did when its adapter
was saved."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import finlora.train as train_module
from finlora.config import load_config
from finlora.data import synthetic_sentiment
from finlora.inference import load_run
from finlora.methods import METHODS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("real_home")]

TEXTS = [e.text for e in synthetic_sentiment(6, seed=13)]
SMALL = {"prefix": ["prefix.num_virtual_tokens=8"], "prompt": ["prompt.num_virtual_tokens=8"]}
# LoRA's options on two projections a layer: what each changes is in every layer it wraps, and
# PiSSA's and OLoRA's decompositions of all seven would cost the suite a minute.
QV = "lora.target_modules=[q_proj,v_proj]"
CASES = {method: [f"method.name={method}", *SMALL.get(method, [])] for method in METHODS} | {
    "lora-dora": [QV, "lora.use_dora=true"],
    "lora-rslora": [QV, "lora.use_rslora=true"],
    "lora-pissa": [QV, "lora.init=pissa"],
    "lora-olora": [QV, "lora.init=olora"],
    "lora-plus": [QV, "lora.loraplus_lr_ratio=16"],
    "lora-4bit": [QV, "model.quantize=4bit"],
}
# PiSSA and OLoRA train on a residual base and are saved as the rank-2r LoRA of the original
# base that they equal: the same function, summed in another order, so equal to float rounding.
CONVERTED = {"lora-pissa", "lora-olora"}


@pytest.mark.parametrize("case", list(CASES))
def test_method_on_smollm2_reloads_exactly(
    case: str, tmp_path: Path, capture_epoch_probs: Callable[[list[str]], dict[str, np.ndarray]]
) -> None:
    cfg = load_config(
        None,
        [
            "data.format=synthetic",
            "data.synthetic_size=60",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.log_every=1",
            "train.precision=fp32",  # exact comparison on any CPU
            "speed.merge_for_inference=false",  # reload as trained: an exact comparison
            *CASES[case],
        ],
    )
    seen = capture_epoch_probs(TEXTS)
    out = tmp_path / case
    train_module.train(cfg, out, progress_bar=False, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "step"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    loaded = load_run(out)
    np.testing.assert_allclose(
        loaded.proba(TEXTS, progress=False, calibrate=False),
        seen["probs"],
        atol=1e-5 if case in CONVERTED else 1e-6,
    )
