"""What a resumed run may change, and the check that it resumes on the same data."""

from __future__ import annotations

from pathlib import Path

from finlora.config import RunConfig
from finlora.data.prepare import PreparedData, PreparedInstruct
from finlora.errors import FinloraError
from finlora.runs import RunDir, SplitRecord

# What a resumed run may change: how long it goes on, how often it logs and saves, and how it
# computes. The data, seed, model, method and optimizer settings are the checkpoint's: a new
# learning rate would be overwritten by the restored scheduler, and new data or a new seed would
# train the rest of the run on rows the split never held.
RESUME_FIXED = {
    "train.learning_rate", "train.batch_size", "train.grad_accum", "train.weight_decay",
    "train.warmup_ratio", "train.max_grad_norm",
}  # fmt: skip


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The config a stopped run was started with, plus `--set` overrides of `train.` and
    `speed.` settings that do not change what it learns (e.g. more epochs or steps)."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FinloraError(f"{run_dir}: nothing to resume (no config.yaml)")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith(("train.", "speed.")) or key in RESUME_FIXED:
            raise FinloraError(
                f"--set {key}: a resumed run keeps the settings it started with; only "
                "train. and speed. settings such as train.epochs or train.max_steps may change "
                "(start a new run to change the rest)"
            )
    return run.read_config(overrides)


def check_same_split(run: RunDir, data: PreparedData | PreparedInstruct) -> None:
    """Refuse to resume on data that no longer splits into the rows the run started with."""
    recorded = SplitRecord.read(run.split)
    if not (recorded.fingerprint.matches(data) and recorded.same_rows(data)):
        raise FinloraError(
            f"{run.root}: the data no longer gives the split this run started with "
            f"({data.description} changed since); start a new run"
        )
