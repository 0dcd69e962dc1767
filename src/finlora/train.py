"""The training recipe: data -> base model -> tuning method -> AdamW loop -> best adapter.

The method (`method.name`: lora, prefix, prompt, ptuning, ia3, freeze, full) decides which
weights train and how the adapter is saved; the loop is the same for all of them.

Read top to bottom, this is the story of a run. Everything that can fail on user input (config,
data, split, model path, output directory) is checked before the run directory is created, so a
bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from finlora import atomic
from finlora.checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from finlora.config import RunConfig
from finlora.data.prepare import PreparedData, PreparedInstruct, prepare_data, prepare_instruct
from finlora.data.split import conflicting_labels
from finlora.distributed import World
from finlora.errors import FinloraError
from finlora.generate import SEQ2SEQ_VIRTUAL_TOKENS
from finlora.memory import process_peak_mib
from finlora.methods import build_method, save_adapter, trainable_parameters
from finlora.models import EMBEDDED, BaseModel, Placement, load_base_model
from finlora.models.device import set_gradient_checkpointing
from finlora.models.loading import sha256_file
from finlora.plots import plot_loss_curve
from finlora.runs import Manifest, RunDir, SplitRecord, git_commit, library_versions
from finlora.scoring import autocast, is_prompt_learning, label_loglik, loss_fn, response_nll
from finlora.tasks import Codec, codec_for
from finlora.tasks.classify import (
    LabelCodec,
    inference_batches,
    length_grouped_batches,
    token_budget_chunks,
)
from finlora.tasks.instruct import InstructCodec

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


@dataclass
class _Setup:
    """Everything a run needs, built and checked before the first byte is written."""

    cfg: RunConfig
    data: PreparedData | PreparedInstruct
    base: BaseModel
    model: Any  # the base model with the tuning method applied, not yet placed
    codec: Codec
    train: list[Any]  # the codec's features
    validation: list[Any]
    placement: Placement
    load_seconds: float

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype | None:
        return self.placement.dtype


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


def _check_same_split(run: RunDir, s: _Setup) -> None:
    """Refuse to resume on data that no longer splits into the rows the run started with."""
    recorded = SplitRecord.read(run.split)
    if not (recorded.fingerprint.matches(s.data) and recorded.same_rows(s.data)):
        raise FinloraError(
            f"{run.root}: the data no longer gives the split this run started with "
            f"({s.data.description} changed since); start a new run"
        )


def _absolute_paths(cfg: RunConfig) -> None:
    """Record the data and a model given by a relative path as absolute paths: the run is
    evaluated, served and exported from other working directories."""
    if cfg.data.path:
        cfg.data.path = os.path.abspath(os.path.expanduser(cfg.data.path))
    name = cfg.model.name
    if name not in EMBEDDED and Path(name).expanduser().exists():
        cfg.model.name = os.path.abspath(os.path.expanduser(name))
    template = Path(cfg.data.template).expanduser()
    if template.suffix == ".json" or template.is_file():  # a path, not a shipped name
        cfg.data.template = os.path.abspath(template)


def _prepare(cfg: RunConfig) -> PreparedData | PreparedInstruct:
    if cfg.task != "instruct":
        # Instruction data is never Financial PhraseBank: no $FINLORA_FPB_DIR fallback. Record
        # where the data came from ($FINLORA_FPB_DIR may differ when the run is evaluated).
        cfg.data.path = cfg.data.resolved_path()
        if cfg.data.path is None:
            cfg.data.format = "synthetic"
    _absolute_paths(cfg)  # after the fallback: $FINLORA_FPB_DIR may be relative too
    if cfg.task == "instruct":
        return prepare_instruct(cfg.data, cfg.seed)
    return prepare_data(cfg.data, cfg.seed)


def _features(codec: Codec, rows: list[Any], split: str, log: Log) -> list[Any]:
    cut_before = codec.overflow.count
    features = [codec.encode(row) for row in rows]
    note = codec.overflow.note(cut_before, len(rows), f"{split} record(s)", codec.max_length)
    if note:
        log(f"data: {note}")
    kept = [f for f in features if f is not None]
    if len(kept) < len(features):
        # Only instruction records can lose every answer token to data.max_length.
        log(
            f"data: {len(features) - len(kept)} {split} record(s) skipped: the prompt fills "
            "data.max_length and leaves no answer token to train on"
        )
    return kept


def _setup(cfg: RunConfig, log: Log, trust_remote_code: bool = False) -> _Setup:
    data = _prepare(cfg)
    placement = Placement.from_config(cfg.train, cfg.speed)
    start = time.perf_counter()
    # Seeded before loading: an encoder classifier's new head is drawn while it loads.
    torch.manual_seed(cfg.seed)
    base = load_base_model(
        cfg.model.name,
        trust_remote_code,
        placement.attention,
        kind=cfg.model.kind,
        labels=data.labels,
    )
    load_seconds = time.perf_counter() - start
    torch.manual_seed(cfg.seed)
    # Built here, before the run directory exists: a method that cannot serve this kind of
    # model is a user mistake like any other.
    model = build_method(base.model, cfg, base.kind)
    if cfg.task == "instruct" and base.kind == "seq2seq" and is_prompt_learning(model):
        raise FinloraError(SEQ2SEQ_VIRTUAL_TOKENS)
    codec = codec_for(cfg.task, base.tokenizer, cfg.data, data.labels, base.kind)
    sizes = {name: len(getattr(data.split, name)) for name in ("train", "validation", "test")}
    log(f"data: {data.description} -> {sizes}")
    if data.duplicates:
        log(f"data: {len(data.duplicates)} exact duplicate text(s) appear in more than one split")
    if isinstance(data, PreparedData):
        conflicts = conflicting_labels(data.examples)
        if conflicts:
            log(
                f"data: {len(conflicts)} text(s) appear with different labels, e.g. "
                f"{conflicts[0][:80]!r}"
            )
    train = _features(codec, data.rows("train"), "train", log)
    if not train:
        raise FinloraError("data: no training example fits data.max_length")
    return _Setup(
        cfg,
        data,
        base,
        model,
        codec,
        train=train,
        validation=_features(codec, data.rows("validation"), "validation", log),
        placement=placement,
        load_seconds=load_seconds,
    )


def _write_run_header(run: RunDir, s: _Setup) -> None:
    atomic.write_text(run.config, s.cfg.to_yaml())
    run.write_template(s.cfg.data.template)
    SplitRecord.of(s.cfg.task, s.cfg.seed, s.data).write(run.split)
    _save_dir(run.tokenizer, s.base.tokenizer.save_pretrained)


def _save_dir(target: Path, save: Callable[[Path], Any]) -> None:
    with atomic.atomic_dir(target) as tmp:
        save(tmp)


@torch.no_grad()
def validate(model: Any, s: _Setup, fast: bool, world: World | None = None) -> dict[str, float]:
    """Validation loss (per label or answer token), perplexity and, for classify, accuracy.

    Under several processes each scores its share of the rows and the sums are exchanged, so
    every process gets the same figures.
    """
    if not s.validation:
        return {}
    world = world or World()
    mine = world.rows(range(len(s.validation)))
    if s.cfg.task == "instruct":
        model.eval()
        assert isinstance(s.codec, InstructCodec)
        nll, count = response_nll(
            model,
            s.codec,
            [s.validation[i] for i in mine],
            s.cfg.speed.eval_batch_size,
            s.device,
            s.dtype,
            fast,
        )
        model.train()
        nll_sum, tokens = world.sum([nll, count], s.device)
        loss = nll_sum / tokens
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}
    assert isinstance(s.codec, LabelCodec)
    model.eval()
    gold = np.array([f.label for f in s.validation])
    loglik = torch.zeros(len(s.validation), len(s.codec.labels), dtype=torch.float64)
    with autocast(s.device, s.dtype):
        prompts = [s.validation[i].prompt_ids for i in mine]
        lengths = [len(p) for p in prompts]
        speed = s.cfg.speed
        for idx in inference_batches(lengths, speed.eval_batch_size, speed.trim_padding):
            chunk = [prompts[i] for i in idx]
            shared = speed.shared_prompt_scoring
            scores = label_loglik(model, s.codec, chunk, fast, s.device, shared)
            loglik[[mine[i] for i in idx]] = scores.double().cpu()
    model.train()
    # Rows another process scored are zero here, so the sum is every process's rows once.
    scored = world.sum_tensor(loglik.to(s.device)).cpu().numpy()
    tokens = sum(len(s.codec.label_ids[g]) for g in gold)
    loss = float(-scored[np.arange(len(gold)), gold].sum() / tokens)
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(min(loss, 700.0)),
        "val_accuracy": float((scored.argmax(1) == gold).mean()),
    }


def _selection_score(metrics: dict[str, float]) -> float | None:
    """Accuracy first; the loss breaks ties (it is finer-grained on small validation sets).
    Without an accuracy (instruction tuning), the lowest loss wins."""
    if "val_loss" not in metrics:
        return None
    if "val_accuracy" not in metrics:
        return -metrics["val_loss"]
    return metrics["val_accuracy"] - 1e-6 * metrics["val_loss"]


def _end_epoch(
    model: Any, s: _Setup, run: RunDir, progress: Progress, log: Log, world: World
) -> dict[str, Any]:
    metrics = validate(model, s, s.cfg.speed.label_logits_only, world)
    train_loss = progress.epoch_loss_sum / max(progress.epoch_loss_count, 1)
    row: dict[str, Any] = {
        "kind": "epoch",
        "epoch": progress.epoch + 1,
        "step": progress.step,
        "train_loss": train_loss,
        "train_perplexity": math.exp(min(train_loss, 700.0)),
        **metrics,
    }
    score = _selection_score(metrics)
    # Without a validation split every epoch "wins", so the last one is kept.
    if score is None or progress.best_metric is None or score > progress.best_metric:
        progress.best_metric = score
        progress.best_epoch = progress.epoch + 1
        if world.is_main:
            _save_dir(run.adapter, lambda tmp: save_adapter(model, s.cfg, tmp))
        row["best"] = True
    if world.is_main:
        run.append_metrics(row)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
    log(f"epoch {row['epoch']}: {shown}{' (best so far)' if row.get('best') else ''}")
    return row


def _checkpoint(run: RunDir, model: Any, opt: Any, sched: Any, progress: Progress) -> None:
    target = run.checkpoints / f"step-{progress.step:07d}"
    save_checkpoint(target, model, opt, sched, progress)
    for old in run.checkpoints.glob("step-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def accumulate_batch(
    model: Any,
    codec: Codec,
    features: list[Any],
    cfg: RunConfig,
    placement: Placement,
    world: World | None = None,
) -> tuple[float, int]:
    """Accumulate one batch's gradients; returns its mean target-token loss and real tokens.

    Targets are the label tokens (classify) or the answer tokens (instruct). The batch runs in
    micro-batches of at most `speed.max_batch_tokens` padded tokens ("auto": by precision). Each
    micro-batch's mean loss is weighted by its share of the batch's target tokens, so the
    summed gradients equal those of the whole batch at once. Under several processes, this
    one takes its rows of the batch (`World.rows`) with the same weights, and the loss and
    tokens returned are the whole batch's; the gradients are summed at the optimizer step
    (`World.sum_gradients`).
    """
    world = world or World()
    total_targets = sum(codec.target_count(f) for f in features)
    features = world.rows(features)
    label_tokens = [codec.target_count(f) for f in features]
    widths = [codec.width(f) for f in features]
    loss_sum, real = 0.0, 0
    # Not cut further to trim padding (as scoring is): batches are already grouped by length,
    # and a training pass has so many operators (backward included) that two more passes cost
    # more than the ~10% of padding they would save, measured on fp32 and bf16 CPUs.
    # A process may have no rows of a short last batch: then no chunk, and zeros to the sum.
    for chunk in token_budget_chunks(widths, placement.batch_tokens(cfg.speed.max_batch_tokens)):
        batch = codec.training_batch([features[i] for i in chunk]).to(placement.device)
        share = sum(label_tokens[i] for i in chunk) / total_targets
        with autocast(placement.device, placement.dtype):
            loss = loss_fn(model, batch, codec.kind, cfg.speed.label_logits_only) * share
        (loss / cfg.train.grad_accum).backward()
        loss_sum += loss.item()
        real += batch.real_tokens
    loss_sum, whole = world.sum([loss_sum, real], placement.device)
    return loss_sum, int(whole)


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

    Started by `finlora train --nproc N` or `torchrun --nproc-per-node N`, the N processes train
    one model data-parallel (`finlora.distributed`); rank 0 writes the run.
    """
    world = World.from_env()
    log = log if world.is_main else _quiet
    run = RunDir(output)
    if world.is_main and not resume:
        run.check_new(overwrite)
    s = _setup(cfg, log, trust_remote_code)
    if resume:
        _check_same_split(run, s)
    s.placement = dataclasses.replace(s.placement, device=world.device(s.placement.device))
    with world.group(s.device):
        if resume:
            return _train(s, run, world, resume, progress_bar and world.is_main, log)
        if world.is_main:
            run.create(overwrite)
        try:
            if world.is_main:
                _write_run_header(run, s)
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
    s: _Setup, run: RunDir, world: World, resume: bool, progress_bar: bool, log: Log
) -> TrainResult:
    cfg, tc = s.cfg, s.cfg.train
    model = s.placement.place(s.model)
    set_gradient_checkpointing(
        model, cfg.speed.gradient_checkpointing, cfg.speed.gradient_checkpointing_every
    )
    world.broadcast_trainable(model)
    trainable, total = trainable_parameters(model)
    processes = f" x {world.size} processes" if world.distributed else ""
    log(
        f"model: {cfg.model.name} ({s.base.kind}), method {cfg.method.name}, "
        f"trainable {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%), device {s.device}{processes}, "
        f"{'bf16 autocast' if s.dtype else 'fp32'}"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=tc.weight_decay)
    lengths = [s.codec.width(f) for f in s.train]
    batches_per_epoch = math.ceil(len(s.train) / tc.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(tc.warmup_ratio * total_steps), total_steps
    )
    progress = Progress(step=0, epoch=0, batch_in_epoch=0)
    if resume:
        found = latest_checkpoint(run.checkpoints)
        if found is None:
            raise FinloraError(f"{run.root}: no checkpoint to resume from")
        progress = load_checkpoint(found, model, optimizer, scheduler)
        if world.is_main:
            run.truncate_metrics(progress.step)
        log(f"resuming from {found.name} (epoch {progress.epoch + 1}, step {progress.step})")
        if progress.step >= total_steps:
            log(
                f"note: step {progress.step} is already at the {total_steps} steps these "
                "settings allow, so there is nothing to train (raise train.max_steps or "
                "train.epochs to go on)"
            )
    first_step = progress.step

    def checkpoint() -> None:
        if world.is_main:
            _checkpoint(run, model, optimizer, scheduler, progress)

    model.train()
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        desc="training",
        unit="step",
        disable=not progress_bar,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    tokens_seen, recent = 0, deque[float](maxlen=10)
    done = progress.step >= total_steps
    while not done and progress.epoch < tc.epochs:
        batches = length_grouped_batches(
            lengths, tc.batch_size, cfg.seed + progress.epoch, cfg.speed.group_by_length
        )
        for bi in range(progress.batch_in_epoch, len(batches)):
            loss, real_tokens = accumulate_batch(
                model, s.codec, [s.train[i] for i in batches[bi]], cfg, s.placement, world
            )
            if not math.isfinite(loss):
                raise FinloraError(
                    f"training diverged: the loss is {loss} at step {progress.step + 1} "
                    f"(learning rate {cfg.learning_rate:g}; try a lower one)"
                )
            tokens_seen += real_tokens
            progress.epoch_loss_sum += loss
            progress.epoch_loss_count += 1
            recent.append(loss)
            if (bi + 1) % tc.grad_accum and bi + 1 < len(batches):
                continue
            world.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.batch_in_epoch = bi + 1
            rate = tokens_seen / max(time.perf_counter() - start, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", tok_s=f"{rate:.0f}")
            if progress.step % tc.log_every == 0 and world.is_main:
                run.append_metrics(
                    {
                        "kind": "step",
                        "step": progress.step,
                        "epoch": progress.epoch + (bi + 1) / len(batches),
                        "loss": loss,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": rate,
                    }
                )
            if progress.step % tc.checkpoint_every == 0:
                checkpoint()
            if progress.step >= total_steps:
                done = True
                break
        _end_epoch(model, s, run, progress, log, world)
        if progress.batch_in_epoch >= len(batches):
            # A run stopped by max_steps stays inside its epoch, so extending it continues there.
            progress.epoch += 1
            progress.batch_in_epoch = 0
            progress.epoch_loss_sum, progress.epoch_loss_count = 0.0, 0
        checkpoint()
    bar.close()
    seconds = time.perf_counter() - start
    peak_mib = process_peak_mib()
    if world.is_main:
        _finish(run, s, progress, seconds, tokens_seen, (trainable, total), world.size)
    world.barrier()  # the others read the metrics rank 0 has just finished writing
    rows = [r for r in run.read_metrics() if r.get("best")]
    return TrainResult(
        run_dir=run.root,
        steps=progress.step,
        steps_now=progress.step - first_step,
        best_epoch=progress.best_epoch,
        best_val_accuracy=rows[-1].get("val_accuracy") if rows else None,
        best_val_loss=rows[-1].get("val_loss") if rows else None,
        train_seconds=seconds,
        real_tokens_per_s=tokens_seen / max(seconds, 1e-9),
        peak_rss_mib=peak_mib,
    )


def _finish(
    run: RunDir,
    s: _Setup,
    progress: Progress,
    seconds: float,
    tokens: int,
    params: tuple[int, int],
    processes: int,
) -> None:
    """Write the loss curve and the manifest."""
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
