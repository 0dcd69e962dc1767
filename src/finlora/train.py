"""The training recipe: data -> base model -> tuning method -> AdamW loop -> best adapter.

The method (`method.name`: lora, prefix, prompt, ptuning, ia3, freeze, full) decides which
weights train and how the adapter is saved; the loop is the same for all of them.

Read top to bottom, this is the story of a run: `_setup` (`_setup_data`, `_setup_model`, the
codec's features), then `_train`: `_place_model`, `_setup_optimizer`, `_resume` where asked, one
`_epoch` after another (`_accumulate`, `optimizer_step`, `_after_step`; `_end_epoch` validates and
keeps the best adapter) and `finish_run`. The parts live in `finlora.training`. Everything that can
fail on user input (config, data, split, model path, output directory) is checked before the run
directory is created, so a bad input never leaves a half-written run behind.

Crash safety: every file of the run is written atomically (`finlora.atomic`) and checkpoints are
whole or absent, so a run killed at any point resumes (`--resume`) from its last checkpoint to
the same adapter, byte for byte; a run killed before its first checkpoint starts again with
--overwrite. A write that fails (a full disk) stops the run in one line naming the path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from finlora import atomic
from finlora.checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from finlora.config import RunConfig
from finlora.data.preference_prepare import prepare_preference
from finlora.data.prepare import PreparedData, PreparedInstruct, prepare_data, prepare_instruct
from finlora.distributed import World
from finlora.errors import FinloraError
from finlora.generate import SEQ2SEQ_VIRTUAL_TOKENS
from finlora.memory import process_peak_mib
from finlora.methods import build_method, save_adapter, trainable_parameters, training_hooks
from finlora.methods.hooks import DEFAULT_HOOKS, TrainingHooks
from finlora.models import BaseModel, Placement, load_base_model
from finlora.models.device import set_gradient_checkpointing
from finlora.models.quantize import check_quantize, prepare_for_training
from finlora.runs import (
    RunDir,
)
from finlora.scoring import is_prompt_learning
from finlora.tasks import codec_for
from finlora.tasks.classify import length_grouped_batches
from finlora.training.data import encode_split, log_data, training_features
from finlora.training.manifest import finish_run
from finlora.training.neftune import noisy_embeddings
from finlora.training.objective import objective_for
from finlora.training.resume import check_same_split, resume_config
from finlora.training.run_files import (
    absolute_paths,
    append_metrics,
    check_resumable,
    check_retry,
    save_calibration,
    save_dir,
    write_run_header,
)
from finlora.training.setup import Setup
from finlora.training.start import keep_start, load_start, start_dir
from finlora.training.step import accumulate_batch, optimizer_step, total_steps
from finlora.training.validation import selection_score

__all__ = ["TrainResult", "accumulate_batch", "resume_config", "train"]

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # the run's optimizer steps in all
    steps_now: int  # of those, the steps this call took (fewer on --resume)
    best_epoch: int | None
    best_val_accuracy: float | None
    best_val_loss: float | None
    train_seconds: float
    real_tokens_per_s: float
    peak_rss_mib: float  # the whole process's, model loading included


def _setup_data(cfg: RunConfig) -> PreparedData | PreparedInstruct:
    """Read and split the data; record in `cfg` where it came from, as absolute paths."""
    if cfg.task == "classify" and not cfg.data.sources:
        # Instruction data is never Financial PhraseBank: no $FINLORA_FPB_DIR fallback. Record
        # where the data came from ($FINLORA_FPB_DIR may differ when the run is evaluated).
        cfg.data.path = cfg.data.resolved_path()
        if cfg.data.path is None:
            cfg.data.format = "synthetic"
    absolute_paths(cfg)  # after the fallback: $FINLORA_FPB_DIR may be relative too
    prepare = {"instruct": prepare_instruct, "preference": prepare_preference}
    return prepare.get(cfg.task, prepare_data)(cfg.data, cfg.seed)


def _setup_model(
    cfg: RunConfig, labels: list[str], placement: Placement, trust: bool, adapter: Path | None
) -> tuple[BaseModel, Any, float]:
    """The base model with the tuning method applied (not yet placed; `adapter`, the one the
    run starts from, loaded into it), and its load time."""
    start = time.perf_counter()
    # Seeded before loading: an encoder classifier's new head is drawn while it loads.
    torch.manual_seed(cfg.seed)
    base = load_base_model(
        cfg.model.name, trust, placement.attention, kind=cfg.model.kind, labels=labels,
        quantize=cfg.model.quantize,
    )  # fmt: skip
    load_seconds = time.perf_counter() - start
    torch.manual_seed(cfg.seed)
    # Built here, before the run directory exists: a method that cannot serve this kind of
    # model is a user mistake like any other.
    model = build_method(prepare_for_training(base.model, cfg.model.quantize), cfg, base.kind)
    if adapter is not None:
        load_start(model, cfg, adapter)
    if cfg.task == "instruct" and base.kind == "seq2seq" and is_prompt_learning(model):
        raise FinloraError(SEQ2SEQ_VIRTUAL_TOKENS)
    return base, model, load_seconds


def _setup(
    cfg: RunConfig, log: Log, trust_remote_code: bool = False, run: RunDir | None = None
) -> Setup:
    placement = Placement.from_config(cfg.train, cfg.speed)
    check_quantize(cfg.model.quantize, cfg.method.name, placement.device.type, cfg.lora.init)
    data = _setup_data(cfg)
    start = start_dir(cfg, run, resume=run is not None)
    base, model, load_seconds = _setup_model(cfg, data.labels, placement, trust_remote_code, start)
    codec = codec_for(cfg.task, base.tokenizer, cfg.data, data.labels, base.kind)
    log_data(data, log)
    train = training_features(codec, data.rows("train"), cfg, log)
    if not train:
        raise FinloraError("data: no training example fits data.max_length")
    training_hooks(cfg).prepare(model, cfg, total_steps(len(train), cfg.train))
    validation = encode_split(codec, data.rows("validation"), "validation", log)
    objective = objective_for(cfg, codec, data)
    return Setup(
        cfg, data, base, model, codec, train, validation, placement, load_seconds, objective,
        start,
    )  # fmt: skip


@dataclass
class _Loop:
    """The loop's own state: the placed model, its optimizer and schedule, where it stands."""

    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    lengths: list[int]  # each training feature's width, for batches of like lengths
    hooks: TrainingHooks = DEFAULT_HOOKS  # the method's parts of the loop
    progress: Progress = field(default_factory=lambda: Progress(step=0, epoch=0, batch_in_epoch=0))
    bar: Any = None
    start: float = 0.0
    tokens_seen: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=10))


def _place_model(s: Setup, world: World, log: Log) -> tuple[Any, tuple[int, int]]:
    """The model on its device, every process with rank 0's trainable weights; returns it with
    its (trainable, total) parameter counts."""
    speed = s.cfg.speed
    model = s.placement.place(s.model)
    set_gradient_checkpointing(
        model, speed.gradient_checkpointing, speed.gradient_checkpointing_every
    )
    world.broadcast_trainable(model)
    trainable, total = trainable_parameters(model)
    processes = f" x {world.size} processes" if world.distributed else ""
    log(
        f"model: {s.cfg.model.name} ({s.base.kind}), method {s.cfg.method.name}, "
        f"trainable {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%), device {s.device}{processes}, "
        f"{'bf16 autocast' if s.dtype else 'fp32'}"
    )
    return model, (trainable, total)


def _setup_optimizer(s: Setup, model: Any) -> _Loop:
    """The method's optimizer (AdamW; LoRA+ where asked), linear warmup and decay over the run."""
    tc = s.cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    hooks = training_hooks(s.cfg)
    optimizer = hooks.optimizer(model, s.cfg)
    steps = total_steps(len(s.train), tc)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * steps), steps)
    widths = [s.codec.width(f) for f in s.train]
    return _Loop(model, params, optimizer, scheduler, steps, widths, hooks)


def _resume(run: RunDir, loop: _Loop, world: World, log: Log) -> None:
    """Restore the newest checkpoint's weights, optimizer, schedule and progress into `loop`."""
    found = latest_checkpoint(run.checkpoints)
    if found is None:
        raise FinloraError(f"{run.root}: no checkpoint to resume from")
    loop.progress = progress = load_checkpoint(
        found, loop.model, loop.optimizer, loop.scheduler, loop.hooks.load_state
    )
    if world.is_main:
        run.truncate_metrics(progress.step)
    log(f"resuming from {found.name} (epoch {progress.epoch + 1}, step {progress.step})")
    if progress.step >= loop.total_steps:
        log(
            f"note: step {progress.step} is already at the {loop.total_steps} steps these "
            "settings allow, so there is nothing to train (raise train.max_steps or "
            "train.epochs to go on)"
        )


def _end_epoch(
    model: Any, s: Setup, run: RunDir, progress: Progress, log: Log, world: World
) -> dict[str, Any]:
    """Validate, keep the adapter if it is the best so far, and log the epoch's row."""
    atomic.kill_point("validation")
    metrics = s.objective.validate(model, s.codec, s.validation, s.cfg.speed, s.placement, world)
    train_loss = progress.epoch_loss_sum / max(progress.epoch_loss_count, 1)
    row: dict[str, Any] = {
        "kind": "epoch",
        "epoch": progress.epoch + 1,
        "step": progress.step,
        **s.objective.epoch_metrics(train_loss),
        **metrics,
    }
    score = selection_score(metrics)
    # Without a validation split every epoch "wins", so the last one is kept.
    if score is None or progress.best_metric is None or score > progress.best_metric:
        progress.best_metric = score
        progress.best_epoch = progress.epoch + 1
        if world.is_main:
            save_dir(run.adapter, lambda tmp: save_adapter(model, s.cfg, tmp))
            save_calibration(run, metrics, progress.epoch + 1)
        row["best"] = True
    if world.is_main:
        append_metrics(run, row)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
    log(f"epoch {row['epoch']}: {shown}{' (best so far)' if row.get('best') else ''}")
    return row


def _checkpoint(run: RunDir, loop: _Loop) -> None:
    target = run.checkpoints / f"step-{loop.progress.step:07d}"
    state = loop.hooks.state(loop.model)
    save_checkpoint(target, loop.model, loop.optimizer, loop.scheduler, loop.progress, state)
    atomic.kill_point("prune")
    # Only once the new checkpoint is whole and in place: a stop before here keeps the old.
    for old in run.checkpoints.glob("step-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _save_checkpoint(run: RunDir, loop: _Loop, world: World) -> None:
    if world.is_main:
        _checkpoint(run, loop)


def _quiet(message: str) -> None:
    """The log of a process other than rank 0: rank 0 speaks for all."""


def train(
    cfg: RunConfig,
    output: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress_bar: bool = True,
    log: Log = _stderr,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Fine-tune per `cfg` into the run directory `output`; with `resume`, continue it.

    `trust_remote_code` lets the model run its own code (never read from `cfg`). Started by
    `finlora train --nproc N` or `torchrun --nproc-per-node N`, the N processes train one model
    data-parallel (`finlora.distributed`); rank 0 writes the run.
    """
    world = World.from_env()
    log = log if world.is_main else _quiet
    run = RunDir(output)
    if resume:
        check_resumable(run, world)
    elif world.is_main:
        check_retry(run, overwrite)
        run.check_new(overwrite)
    s = _setup(cfg, log, trust_remote_code, run if resume else None)
    if resume:
        check_same_split(run, s.data)
    s.placement = dataclasses.replace(s.placement, device=world.device(s.placement.device))
    with world.group(s.device):
        if resume:
            return _train(s, run, world, resume, progress_bar and world.is_main, log)
        if world.is_main:
            run.create(overwrite)
        try:
            if world.is_main:
                write_run_header(run, s.cfg, s.data, s.base.tokenizer)
                if s.start is not None:
                    keep_start(run, s.start)
            return _train(s, run, world, resume, progress_bar and world.is_main, log)
        except BaseException:
            # A new run that failed or was stopped (Ctrl-C; `finlora` turns SIGTERM into the
            # same) before its first checkpoint is not left half-written: nothing in it could be
            # resumed, and it would stand in the way of the same command run again. With a
            # checkpoint it stays, for --resume.
            if world.is_main and latest_checkpoint(run.checkpoints) is None:
                shutil.rmtree(run.root, ignore_errors=True)
            raise


def _train(
    s: Setup, run: RunDir, world: World, resume: bool, progress_bar: bool, log: Log
) -> TrainResult:
    model, params = _place_model(s, world, log)
    # Before a checkpoint is loaded: what the task measures of the starting model.
    s.train, s.validation = s.objective.prepare(model, s.train, s.validation, s.placement, log)
    loop = _setup_optimizer(s, model)
    if resume:
        _resume(run, loop, world, log)
    first_step = loop.progress.step
    model.train()
    loop.bar = tqdm(
        total=loop.total_steps,
        initial=loop.progress.step,
        desc="training",
        unit="step",
        disable=not progress_bar,
        dynamic_ncols=True,
    )
    loop.start = time.perf_counter()
    with noisy_embeddings(model, s.cfg.train.neftune_alpha):
        while loop.progress.step < loop.total_steps and loop.progress.epoch < s.cfg.train.epochs:
            _epoch(s, run, world, loop, log)
    loop.bar.close()
    seconds = time.perf_counter() - loop.start
    peak_mib = process_peak_mib()
    if world.is_main:
        finish_run(run, s, loop.progress, seconds, loop.tokens_seen, params, world.size)
    world.barrier()  # the others read the metrics rank 0 has just finished writing
    rows = [r for r in run.read_metrics() if r.get("best")]
    return TrainResult(
        run_dir=run.root,
        steps=loop.progress.step,
        steps_now=loop.progress.step - first_step,
        best_epoch=loop.progress.best_epoch,
        best_val_accuracy=rows[-1].get("val_accuracy") if rows else None,
        best_val_loss=rows[-1].get("val_loss") if rows else None,
        train_seconds=seconds,
        real_tokens_per_s=loop.tokens_seen / max(seconds, 1e-9),
        peak_rss_mib=peak_mib,
    )


def _epoch(s: Setup, run: RunDir, world: World, loop: _Loop, log: Log) -> None:
    """The rest of the current epoch: its batches (a step every grad_accum of them, and at its
    end), then the validation and a checkpoint. Stops early at the run's last step."""
    cfg, tc, progress = s.cfg, s.cfg.train, loop.progress
    batches = length_grouped_batches(
        loop.lengths, tc.batch_size, cfg.seed + progress.epoch, cfg.speed.group_by_length
    )
    for bi in range(progress.batch_in_epoch, len(batches)):
        loss = _accumulate(s, world, loop, batches[bi])
        if (bi + 1) % tc.grad_accum and bi + 1 < len(batches):
            continue
        after_update = functools.partial(loop.hooks.after_update, loop.model, progress.step + 1)
        optimizer_step(
            loop.model, loop.params, loop.optimizer, loop.scheduler, tc.max_grad_norm, world,
            after_update,
        )  # fmt: skip
        progress.step += 1
        progress.batch_in_epoch = bi + 1
        last = bi + 1 == len(batches) or progress.step >= loop.total_steps
        _after_step(s, run, world, loop, loss, (bi + 1) / len(batches), last)
        if progress.step >= loop.total_steps:
            break
    _end_epoch(loop.model, s, run, progress, log, world)
    if progress.batch_in_epoch >= len(batches):
        # A run stopped by max_steps stays inside its epoch, so extending it continues there.
        progress.epoch += 1
        progress.batch_in_epoch = 0
        progress.epoch_loss_sum, progress.epoch_loss_count = 0.0, 0
    _save_checkpoint(run, loop, world)


def _accumulate(s: Setup, world: World, loop: _Loop, rows: list[int]) -> float:
    """One batch's gradients (`accumulate_batch`), counted into the epoch's loss; returns it."""
    features = [s.train[i] for i in rows]
    loss, real_tokens = s.objective.accumulate(
        loop.model, s.codec, features, s.cfg, s.placement, world
    )
    if not math.isfinite(loss):
        raise FinloraError(
            f"training diverged: the loss is {loss} at step {loop.progress.step + 1} "
            f"(learning rate {s.cfg.learning_rate:g}; try a lower one)"
        )
    loop.tokens_seen += real_tokens
    loop.progress.epoch_loss_sum += loss
    loop.progress.epoch_loss_count += 1
    loop.recent.append(loss)
    return loss


def _after_step(
    s: Setup,
    run: RunDir,
    world: World,
    loop: _Loop,
    loss: float,
    epoch_share: float,
    last: bool,
) -> None:
    """The progress bar, a metrics row every log_every steps, a checkpoint every
    checkpoint_every steps but the `last` of its epoch or run (its validation follows, then a
    checkpoint of the same step: writing one before would mean replacing a checkpoint, and a
    run stopped in between would validate that epoch twice)."""
    tc, progress = s.cfg.train, loop.progress
    rate = loop.tokens_seen / max(time.perf_counter() - loop.start, 1e-9)
    loop.bar.update(1)
    loop.bar.set_postfix(loss=f"{sum(loop.recent) / len(loop.recent):.4f}", tok_s=f"{rate:.0f}")
    if progress.step % tc.log_every == 0 and world.is_main:
        append_metrics(
            run,
            {
                "kind": "step",
                "step": progress.step,
                "epoch": progress.epoch + epoch_share,
                "loss": loss,
                "lr": loop.scheduler.get_last_lr()[0],
                "tokens_per_s": rate,
            },
        )
    if progress.step % tc.checkpoint_every == 0 and not last:
        _save_checkpoint(run, loop, world)
