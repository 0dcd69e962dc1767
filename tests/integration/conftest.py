"""Fixtures shared by the integration tests on the real embedded models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


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
