"""Every tuning method on the real embedded SmolLM2-135M: two steps on the synthetic set, then
the reloaded run scores exactly as the in-memory model did when its adapter was saved."""

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


@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_smollm2_reloads_exactly(
    method: str, tmp_path: Path, capture_epoch_probs: Callable[[list[str]], dict[str, np.ndarray]]
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
            f"method.name={method}",
            *SMALL.get(method, []),
        ],
    )
    seen = capture_epoch_probs(TEXTS)
    out = tmp_path / method
    train_module.train(cfg, out, progress_bar=False, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "step"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    loaded = load_run(out)
    np.testing.assert_allclose(
        loaded.proba(TEXTS, progress=False, calibrate=False), seen["probs"], atol=1e-6
    )
