"""finlora: offline parameter-efficient fine-tuning of open language models for financial text.

The public API, as the command line uses it:

    cfg = finlora.load_config("configs/fpb-smollm2-lora.yaml", ["train.max_steps=20"])
    finlora.train_run(cfg, "runs/fpb")                # -> TrainResult
    finlora.evaluate_run("runs/fpb")                  # -> metrics dict, reports in runs/fpb/eval
    finlora.load_run("runs/fpb").predict(["..."])     # -> [Prediction(label, probabilities)]
    finlora.export_run("runs/fpb", "exports/fpb", format="gguf")

Each function imports what it needs when called, so `import finlora` stays light. Their names
differ from the modules' (finlora.train, finlora.evaluate, finlora.export): importing a
submodule binds its name on the package, which would replace a function of the same name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finlora.config import RunConfig
    from finlora.export import ExportResult
    from finlora.inference import LoadedRun
    from finlora.train import TrainResult

__version__ = "0.1.0"
__all__ = ["evaluate_run", "export_run", "load_config", "load_run", "train_run"]

# oneDNN (torch's bf16 matmuls on CPUs with AVX512-BF16 or AMX) keeps a JIT-compiled kernel per
# matrix shape, 1,024 by default. Every micro-batch of a different length brings ~25 new shapes,
# which grew a short training run by ~0.3 GiB; 64 trained two epochs at the same speed. Read
# when oneDNN builds its first kernel, so this takes effect even after torch is imported; a
# value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A recipe (YAML file; None: the built-in defaults) with `key.sub=value` overrides."""
    from finlora.config import load_config as _load_config

    return _load_config(Path(path) if path is not None else None, list(overrides))


def train_run(
    cfg: RunConfig,
    output: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Fine-tune per `cfg` into the run directory `output` (`resume`: continue it)."""
    from finlora.train import train

    return train(
        cfg,
        Path(output),
        overwrite=overwrite,
        resume=resume,
        progress_bar=progress,
        trust_remote_code=trust_remote_code,
    )


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    zero_shot: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    speed: Sequence[str] = (),
) -> dict[str, Any]:
    """Metrics of a run on its own test split (or on the labelled file `data`); the reports
    are written under RUN_DIR/eval."""
    from finlora.evaluate import evaluate_run as _evaluate_run

    return _evaluate_run(
        Path(run_dir),
        Path(data) if data is not None else None,
        zero_shot=zero_shot,
        progress=progress,
        trust_remote_code=trust_remote_code,
        speed=speed,
    )


def load_run(
    run_dir: str | Path,
    *,
    zero_shot: bool = False,
    trust_remote_code: bool = False,
    speed: Sequence[str] = (),
) -> LoadedRun:
    """A trained run, ready to `predict(texts)` (classify) or to generate (instruct)."""
    from finlora.inference import load_run as _load_run

    return _load_run(Path(run_dir), zero_shot, trust_remote_code=trust_remote_code, speed=speed)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    format: str = "hf",
    dtype: str | None = None,
    quant: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Merge the run's adapter into its base weights, write `format` (hf, state_dict, gguf) to
    `out`, and verify what was written against the adapter model."""
    from finlora.export import ExportOptions
    from finlora.export import export_run as _export_run

    options = ExportOptions(format, Path(out), dtype=dtype, quant=quant, overwrite=overwrite)
    return _export_run(Path(run_dir), options, trust_remote_code=trust_remote_code)
