"""Data-parallel training in several processes, started by `finlora train --nproc N` or torchrun.

Every process holds the whole model and reads the whole data. Each takes its own rows of every
batch, weights its micro-batches by their share of the *whole* batch's target tokens, and the
processes then sum their gradients before the optimizer step. The summed gradient is the one a
single process computes on the same batch, so the number of processes changes speed, not
results (tests/unit/test_distributed.py checks 2 processes against 1). Rank 0 alone writes the
run directory and talks to the terminal.

Gradients are summed with one `all_reduce` of a flat buffer instead of wrapping the model in
DistributedDataParallel: the wrapper would stand between finlora and the PEFT model it saves,
merges and hooks (fused LoRA layers, lean MLPs), and its gradient averaging would have to be
undone to keep the token weighting exact. Adapters are small, so overlapping the reduction
with the backward pass (DDP's gain) buys little.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from finlora.errors import ERRORS_ENV, STOPPED, FinloraError
from finlora.runs import RunDir

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise FinloraError(f"${name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; one process is a world of size 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """The world a launcher describes in $WORLD_SIZE, $RANK and $LOCAL_RANK (torchrun and
        other launchers set them); without them, a single process."""
        size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if size < 1 or not 0 <= rank < size:
            raise FinloraError(f"$RANK={rank} does not fit $WORLD_SIZE={size}")
        return cls(rank, size, _env_int("LOCAL_RANK", rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """The process's own accelerator: cuda:LOCAL_RANK when several share a machine."""
        if not self.distributed or device.type != "cuda":
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise FinloraError(
                f"process {self.rank} wants cuda:{self.local_rank}, but this machine has "
                f"{torch.cuda.device_count()} GPU(s): start at most that many per machine"
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    @contextlib.contextmanager
    def group(self, device: torch.device) -> Iterator[None]:
        """Join the process group for the duration (NCCL on GPUs, gloo on CPUs); a single
        process joins nothing."""
        if not self.distributed or dist.is_initialized():
            yield
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        # An evaluation on rank 0 may keep the others waiting at a collective for a while.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        try:
            yield
        finally:
            dist.destroy_process_group()

    def rows(self, items: Sequence[T]) -> list[T]:
        """This process's share of a batch: every size-th item from its rank (lengths stay
        mixed alike on every process, as batches are grouped by length)."""
        return list(items[self.rank :: self.size])

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Each value summed over the processes (float64)."""
        if not self.distributed:
            return list(values)
        return self.sum_tensor(torch.tensor(values, dtype=torch.float64, device=device)).tolist()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_trainable(self, model: Any) -> None:
        """Give every process rank 0's trainable weights: each starts from the same seed, so
        this only guards against an initialisation that draws differently per process."""
        if not self.distributed:
            return
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the processes, in one reduction.

        A process whose rows of a batch gave a parameter no gradient (it had no rows, say)
        adds zeros; a parameter that got a gradient on no process keeps none, as it would in
        a single process, so AdamW skips it alike.
        """
        if not self.distributed or not params:
            return
        device = params[0].device

        def flat_grad(p: torch.nn.Parameter) -> torch.Tensor:
            if p.grad is None:
                return torch.zeros(p.numel(), device=device)
            return p.grad.reshape(-1).float()

        grads = [flat_grad(p) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        flat = torch.cat([*grads, present.to(device)])  # (sum of numels + len(params),)
        dist.all_reduce(flat)
        present_anywhere = flat[-len(params) :] > 0
        offset = 0
        for param, anywhere in zip(params, present_anywhere.tolist(), strict=True):
            piece = flat[offset : offset + param.numel()].view_as(param)
            offset += param.numel()
            if anywhere:
                param.grad = piece.to(param.dtype).clone()
            else:
                param.grad = None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@dataclass(frozen=True)
class Launched:
    status: int  # 0, or the first failed process's exit status
    errors: list[str]  # the distinct user errors the processes left, in rank order


def failure_status(exit_codes: Sequence[int]) -> int:
    """The launch's exit status from its processes' (in rank order): the first failure's own.

    When one process fails, the launcher stops the others (SIGTERM, so they exit STOPPED); which
    rank fails first is a race, so a stopped process's status must not stand for the failure.
    """
    failed = [code for code in exit_codes if code > 0]
    return next((code for code in failed if code != STOPPED), failed[0] if failed else 1)


def launch(processes: int, args: Sequence[str], device: str = "auto") -> Launched:
    """Run `finlora ARGS` in `processes` processes on this machine, as `torchrun --standalone
    --nproc-per-node N -m finlora ARGS` would. `device` is the run's train.device: on GPUs,
    each process takes one.

    Each process gets an equal share of the CPU's threads unless $OMP_NUM_THREADS says
    otherwise (torchrun alone would give each one thread). The processes leave their user
    errors (`leave_error`) for the caller to print once; anything else a process prints
    itself, so the launcher's own report of a failure is kept off the terminal.
    """
    import logging
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if processes < 1:
        raise FinloraError(f"--nproc must be at least 1 (got {processes})")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device in ("auto", "cuda") and 0 < gpus < processes:
        raise FinloraError(
            f"--nproc {processes}: this machine has {gpus} GPU(s), one a process "
            "(or set train.device=cpu)"
        )
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)
    status = 0
    with tempfile.TemporaryDirectory(prefix="finlora-errors-") as errors_dir:
        os.environ[ERRORS_ENV] = errors_dir  # the processes inherit it
        try:
            elastic_launch(config, sys.executable)("-m", "finlora", *args)
        except ChildFailedError as exc:
            status = failure_status([f.exitcode for _, f in sorted(exc.failures.items())])
        finally:
            del os.environ[ERRORS_ENV]
            elastic.setLevel(level)
        errors = []
        for name in sorted(os.listdir(errors_dir)):
            with open(os.path.join(errors_dir, name), encoding="utf-8") as fh:
                message = fh.read()
            if message not in errors:
                errors.append(message)
    return Launched(status, errors)


def launch_train(
    processes: int,
    device: str,
    output: Path,
    *,
    config: Path | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
    progress_bar: bool = True,
    trust_remote_code: bool = False,
) -> Launched:
    """`finlora train` with these options again, in `processes` processes (`launch`).

    Called by the process that parsed the command, after it has read the config: the output
    directory is checked here too, so a mistake is one line, not one a process. Raises
    FinloraError when this process was itself started by a launcher.
    """
    if not resume:
        RunDir(output).check_new(overwrite)
    if World.from_env().distributed:
        raise FinloraError("--nproc: this process was already started by a launcher (torchrun)")
    args = ["train", *([str(config)] if config and not resume else [])]
    args += [f"--set={o}" for o in overrides] + ["--output", str(output)]
    flags = {"--overwrite": overwrite, "--resume": resume, "--no-progress": not progress_bar,
             "--trust-remote-code": trust_remote_code}  # fmt: skip
    args += [flag for flag, on in flags.items() if on]
    return launch(processes, args, device)
