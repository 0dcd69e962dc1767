"""Fixtures shared by the integration tests on the real embedded models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import finlora.train as train_module
from finlora.scoring import predict_proba


@pytest.fixture(scope="module")
def real_home() -> Iterator[None]:
    """The persistent model cache (the GGUF is converted once per machine), and every core.

    The unit tests pin one thread for tiny models; the real model wants every core.
    """
    home = os.environ.get("FINLORA_REAL_HOME") or str(Path.home() / ".cache" / "finlora")
    mp = pytest.MonkeyPatch()
    mp.setenv("FINLORA_HOME", home)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture
def capture_epoch_probs(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """Start recording the in-memory model's probabilities of `texts` at every epoch's end
    (where the adapter is saved); returns the dict that holds the latest under "probs"."""

    def start(texts: list[str]) -> dict[str, np.ndarray]:
        seen: dict[str, np.ndarray] = {}
        original = train_module._end_epoch

        def end_epoch(model: Any, s: Any, *rest: Any) -> dict[str, Any]:
            row = original(model, s, *rest)
            seen["probs"] = predict_proba(model, s.codec, texts, progress=False)
            model.train()
            return row

        monkeypatch.setattr(train_module, "_end_epoch", end_epoch)
        return seen

    return start
