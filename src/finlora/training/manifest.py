"""The end of a run: its loss curve and manifest, written from what the run was built from."""

from __future__ import annotations

import dataclasses
import time

from finlora.checkpoint import Progress
from finlora.memory import process_peak_mib
from finlora.models.loading import sha256_file
from finlora.plots import plot_loss_curve
from finlora.runs import Manifest, RunDir, git_commit, library_versions
from finlora.training.setup import Setup


def finish_run(
    run: RunDir,
    s: Setup,
    progress: Progress,
    seconds: float,
    tokens: int,
    params: tuple[int, int],
    processes: int,
) -> None:
    """Write the run's loss curve and its manifest (what trained, on what, how long)."""
    trainable, total = params
    peak_mib = process_peak_mib()
    rows = run.read_metrics()
    if rows:
        plot_loss_curve(rows, run.loss_curve)
    previous = Manifest.read(run.manifest)
    timings = previous.timings if previous is not None else {}
    Manifest(
        task=s.cfg.task,
        base_model={
            "name": s.cfg.model.name,
            "kind": s.base.kind,
            "checkpoint_dir": str(s.base.checkpoint_dir),
            "sha256": s.base.weights_sha256,
        },
        data={
            "description": s.data.description,
            "synthetic": s.data.synthetic,
            "files": {str(f): sha256_file(f) for f in s.data.files},
            "labels": s.data.labels,
        },
        method=s.cfg.method.name,
        method_options=dataclasses.asdict(s.cfg.method_options),
        learning_rate=s.cfg.learning_rate,
        trainable_params=trainable,
        total_params=total,
        seed=s.cfg.seed,
        steps=progress.step,
        best_epoch=progress.best_epoch,
        device=str(s.device),
        processes=processes,
        precision="bf16-autocast" if s.dtype else "fp32",
        attention=s.placement.attention,
        versions=library_versions(),
        git_commit=git_commit(),
        timings={
            "model_load_s": round(s.load_seconds, 2),
            # A resumed run adds its own training time to what came before.
            "train_s": round(timings.get("train_s", 0.0) + seconds, 2),
            "real_tokens": timings.get("real_tokens", 0) + tokens,
            # This process's peak (a resumed run's: since it resumed), loading included;
            # under several processes, rank 0's.
            "peak_rss_mib": round(peak_mib, 1),
        },
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    ).write(run.manifest)
