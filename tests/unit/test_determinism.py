"""The same config and seed give the same run in two fresh processes on one machine: the same
metrics (less the timings) and the same adapter, byte for byte.

Each process gets its own PYTHONHASHSEED, as two real invocations do, so that anything ordered
by string hashes shows up here every time rather than once in a while.

With `lora.target_modules: all-linear` PEFT expands the module names into a set and writes it
as `list(set)`, in the order of the process's string hashing; finlora sorts those lists after
saving (methods/storage.py), and `test_adapter_files_are_byte_identical` holds it to that. No
kernel of the tiny run (CPU, fp32, one thread) differs between processes; GPU kernels are not
covered here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Measured, not computed: they differ from one run to the next by nature.
TIMING_FIELDS = {"tokens_per_s"}


def _train(output: Path, overrides: list[str], hash_seed: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONHASHSEED": hash_seed}  # fmt: skip
    args = [sys.executable, "-m", "finlora.cli", "train", "--output", str(output), "--no-progress"]
    args += [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> list[Path]:
    """The tiny causal run (4 steps) trained twice, in two processes with other hash seeds."""
    root = tmp_path_factory.mktemp("determinism")
    runs = [root / "first", root / "second"]
    for run, hash_seed in zip(runs, ["1", "2"], strict=True):
        _train(run, [*tiny_overrides, "seed=42"], hash_seed)
    return runs


def _metrics(run: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_metrics_are_identical(two_runs: list[Path]) -> None:
    first, second = map(_metrics, two_runs)
    assert any(row["kind"] == "step" for row in first)
    assert first == second  # exact: no tolerance on losses or accuracies


def test_adapter_weights_and_split_are_identical(two_runs: list[Path]) -> None:
    first, second = (_digests(run / "adapter") for run in two_runs)
    assert "adapter_model.safetensors" in first
    assert first.keys() == second.keys()
    differing = {name for name in first if first[name] != second[name]}
    assert differing <= {"adapter_config.json"}, differing
    configs = [
        json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in two_runs
    ]
    for config in configs:  # the one known difference, the order of a list that is a set
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    assert (two_runs[0] / "split.json").read_bytes() == (two_runs[1] / "split.json").read_bytes()


def test_adapter_files_are_byte_identical(two_runs: list[Path]) -> None:
    first, second = (_digests(run / "adapter") for run in two_runs)
    assert first == second
