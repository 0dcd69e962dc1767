"""Integration test on the real embedded all-MiniLM-L6-v2 encoder with a classification head:
LoRA for a few steps on the synthetic set, then the reloaded run predicts exactly as before."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import finlora.train as train_module
from finlora.config import load_config
from finlora.data import synthetic_sentiment
from finlora.errors import FinloraError
from finlora.inference import load_run
from finlora.models.registry import EMBEDDED

pytestmark = pytest.mark.integration

TEXTS = [e.text for e in synthetic_sentiment(8, seed=11)]


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    try:
        EMBEDDED["all-minilm-l6-v2"].locate()
    except Exception as exc:  # noqa: BLE001 - any reason to skip is shown
        pytest.skip(str(exc))


def test_minilm_lora_trains_and_reloads_exactly(
    tmp_path: Path, capture_epoch_probs: Callable[[list[str]], dict[str, np.ndarray]]
) -> None:
    cfg = load_config(
        None,
        [
            "model.name=all-minilm-l6-v2",
            "data.format=synthetic",
            "data.synthetic_size=60",
            "train.max_steps=4",
            "train.log_every=1",
            "train.batch_size=8",
            "train.learning_rate=2e-3",
            "train.precision=fp32",
            "speed.merge_for_inference=false",  # reload as trained: an exact comparison
            "lora.r=8",
            "lora.lora_alpha=16",
        ],
    )
    seen = capture_epoch_probs(TEXTS)
    out = tmp_path / "minilm"
    train_module.train(cfg, out, progress_bar=False, log=lambda m: None)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"]["kind"] == "encoder" and manifest["method"] == "lora"
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "step"
    ]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # The new classification head is saved beside the LoRA weights.
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("classifier" in name for name in saved)
    assert any("lora_A" in name for name in saved)

    loaded = load_run(out)
    np.testing.assert_allclose(
        loaded.proba(TEXTS, progress=False, calibrate=False), seen["probs"], atol=1e-6
    )
    assert {p.label for p in loaded.predict(TEXTS, progress=False)} <= set(loaded.labels)


def test_minilm_full_fine_tuning_trains_and_reloads_exactly(
    tmp_path: Path, capture_epoch_probs: Callable[[list[str]], dict[str, np.ndarray]]
) -> None:
    cfg = load_config(
        None,
        [
            "model.name=all-minilm-l6-v2",
            "method.name=full",
            "data.format=synthetic",
            "data.synthetic_size=60",
            "train.max_steps=3",
            "train.batch_size=8",
            "train.precision=fp32",
            "full.learning_rate=1e-4",
        ],
    )
    seen = capture_epoch_probs(TEXTS)
    out = tmp_path / "minilm-full"
    train_module.train(cfg, out, progress_bar=False, log=lambda m: None)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "full"
    assert manifest["trainable_params"] == manifest["total_params"]
    # Every tuned tensor, the new head included, is stored with the run.
    saved = load_file(str(out / "adapter" / "trainable.safetensors"))
    assert any("classifier" in name for name in saved) and len(saved) > 50

    loaded = load_run(out)
    np.testing.assert_allclose(
        loaded.proba(TEXTS, progress=False, calibrate=False), seen["probs"], atol=1e-6
    )
    # Without the run there is only a random head: no zero-shot model to score.
    with pytest.raises(FinloraError, match="has no zero-shot answer"):
        load_run(out, zero_shot=True)
