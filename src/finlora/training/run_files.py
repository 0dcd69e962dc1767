"""What training writes into the run directory, and the checks before it does: every write is
atomic or cut back when it fails (a full disk stops the run in one line naming the path), so a
run killed at any point resumes from its last checkpoint, or starts again with --overwrite."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finlora import atomic
from finlora.checkpoint import latest_checkpoint
from finlora.config import RunConfig
from finlora.distributed import World
from finlora.errors import FinloraError
from finlora.models import EMBEDDED
from finlora.runs import Calibration, RunDir, SplitRecord

if TYPE_CHECKING:
    from typing import TypeAlias

    from finlora.data.prepare import PreparedData, PreparedInstruct

    Prepared: TypeAlias = PreparedData | PreparedInstruct


def absolute_paths(cfg: RunConfig) -> None:
    """Record the data and a model given by a relative path as absolute paths: the run is
    evaluated, served and exported from other working directories."""
    if cfg.data.path:
        cfg.data.path = os.path.abspath(os.path.expanduser(cfg.data.path))
    for source in cfg.data.sources:
        source.path = os.path.abspath(os.path.expanduser(source.path))
    name = cfg.model.name
    if name not in EMBEDDED and Path(name).expanduser().exists():
        cfg.model.name = os.path.abspath(os.path.expanduser(name))
    template = Path(cfg.data.template).expanduser()
    if template.suffix == ".json" or template.is_file():  # a path, not a shipped name
        cfg.data.template = os.path.abspath(template)


def save_dir(target: Path, save: Callable[[Path], Any]) -> None:
    with atomic.write_errors(target), atomic.atomic_dir(target) as tmp:
        save(tmp)


def append_metrics(run: RunDir, row: dict[str, Any]) -> None:
    """Append a row to metrics.jsonl. An append that fails (a full disk) is cut off again, so
    the file holds whole rows only and the run can still be resumed."""
    size = run.metrics.stat().st_size if run.metrics.exists() else 0
    try:
        with atomic.write_errors(run.metrics):
            run.append_metrics(row)
    except FinloraError:
        with contextlib.suppress(OSError):
            os.truncate(run.metrics, size)
        raise


def save_calibration(run: RunDir, metrics: dict[str, float], epoch: int) -> None:
    """Keep the best epoch's temperature beside its adapter (classification runs only)."""
    if "val_temperature" not in metrics:
        return
    calibration = Calibration(
        metrics["val_temperature"], epoch, metrics["val_ece"], metrics["val_ece_calibrated"]
    )
    with atomic.write_errors(run.calibration):
        calibration.write(run.calibration)


def check_resumable(run: RunDir, world: World) -> None:
    """Before any model is loaded: tidy what writes killed mid-way left in the run, and refuse
    a run without a whole checkpoint to resume from."""
    if world.is_main:
        atomic.clean_leftovers(run.root)
        if run.checkpoints.is_dir():
            atomic.clean_leftovers(run.checkpoints)
    if latest_checkpoint(run.checkpoints) is None:
        raise FinloraError(
            f"{run.root}: no checkpoint to resume from (a run stopped before its first "
            "checkpoint starts again with --overwrite)"
        )


def check_retry(run: RunDir, overwrite: bool) -> None:
    """A run killed before its first checkpoint (SIGKILL leaves no chance to remove it) holds
    nothing to resume: point to --overwrite, the option that starts it again."""
    if overwrite or run.manifest.exists() or not run.is_finlora_run():
        return
    if latest_checkpoint(run.checkpoints) is None:
        raise FinloraError(
            f"{run.root}: a run stopped before its first checkpoint, with nothing to resume "
            "(use --overwrite to start it again)"
        )


def write_run_header(run: RunDir, cfg: RunConfig, data: Prepared, tokenizer: Any) -> None:
    """What a new run writes before its first step: split, config, template copy, tokenizer."""
    # split.json first: it marks the directory as a finlora run (`RunDir.is_finlora_run`), so a
    # run killed while writing the rest can be started again with --overwrite.
    SplitRecord.of(cfg.task, cfg.seed, data).write(run.split)
    atomic.write_text(run.config, cfg.to_yaml())
    run.write_template(cfg.data.template)
    save_dir(run.tokenizer, tokenizer.save_pretrained)
