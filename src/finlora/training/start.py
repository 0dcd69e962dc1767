"""`finlora train CONFIG --from RUN` (`method.start_from`): a run that starts from another run's
trained adapter and trains it further, e.g. preference tuning after instruction tuning.

The method is built as for a new run, then the trained weights of RUN are loaded into it, so
the adapter trains on as it was saved. RUN must be of the same base model and method, with the
same method options (the learning rate aside: those shape the adapter). The starting adapter is
copied into the new run (`start_adapter/`): a resumed run starts from it again, and the eval of
a preference run scores its reference model (the starting model) with it, wherever RUN has gone.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from finlora.config import RunConfig
from finlora.errors import FinloraError
from finlora.methods import METHODS
from finlora.methods.storage import TENSORS_FILE
from finlora.runs import Run, RunDir

START_ADAPTER = "start_adapter"
PEFT_WEIGHTS = "adapter_model.safetensors"


def start_adapter(run: RunDir | Run) -> Path:
    """The run's copy of the adapter it started from."""
    return run.root / START_ADAPTER


def start_dir(cfg: RunConfig, run: RunDir | None, resume: bool) -> Path | None:
    """The adapter directory the run starts from (None: a new adapter): its own copy when it
    resumes, else the `method.start_from` run's, checked against `cfg` (whose start_from
    becomes an absolute path, as the run records it)."""
    source = cfg.method.start_from
    if source is None:
        return None
    if resume:
        assert run is not None
        copy = start_adapter(run)
        if not copy.is_dir():
            raise FinloraError(f"{copy}: missing (the adapter this run started from)")
        return copy
    cfg.method.start_from = os.path.abspath(os.path.expanduser(source))
    return check_start(cfg)


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    return Path(a).expanduser().exists() and Path(a).expanduser().resolve() == Path(b).resolve()


def check_start(cfg: RunConfig) -> Path:
    """The adapter directory of the finished run `cfg.method.start_from`; raises FinloraError
    unless its base model, method and method options are `cfg`'s."""
    assert cfg.method.start_from is not None
    try:
        source = Run.open(Path(cfg.method.start_from))
    except FinloraError as exc:
        raise FinloraError(f"--from {exc}") from None
    theirs = source.config
    where = f"--from {source.root}"
    if not _same_model(cfg.model.name, theirs.model.name):
        raise FinloraError(
            f"{where}: its base model is {theirs.model.name}, this config's {cfg.model.name} "
            f"(set model.name={theirs.model.name})"
        )
    if theirs.method.name != cfg.method.name:
        raise FinloraError(
            f"{where}: its method is {theirs.method.name}, this config's {cfg.method.name} "
            f"(set method.name={theirs.method.name})"
        )
    mine = dataclasses.asdict(cfg.method_options)
    for key, value in dataclasses.asdict(theirs.method_options).items():
        if key != "learning_rate" and mine.get(key) != value:
            raise FinloraError(
                f"{where}: its {cfg.method.name}.{key} is {value!r}, this config's "
                f"{mine.get(key)!r}: the adapter is continued as it was built (set "
                f"{cfg.method.name}.{key} to match)"
            )
    return source.dir.adapter


def _check_names(path: Path, saved: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        name = f"no tensor for {missing[0]}" if missing else f"no place for {unexpected[0]}"
        raise FinloraError(f"{path}: does not match the new adapter ({name})")
    for name, tensor in saved.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise FinloraError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the new adapter's "
                f"{tuple(expected[name].shape)}"
            )


def load_start(model: Any, cfg: RunConfig, directory: Path) -> None:
    """Load the adapter saved in `directory` into `model`, the method just built on the base
    model (its weights trainable), so training continues from it. Raises FinloraError for an
    adapter that does not fit."""
    storage = METHODS[cfg.method.name].storage
    if storage not in ("peft", "tensors"):
        raise FinloraError(f"--from: a {cfg.method.name} adapter cannot be trained further")
    path = directory / (PEFT_WEIGHTS if storage == "peft" else TENSORS_FILE)
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise FinloraError(f"{path}: cannot read the starting adapter ({exc})") from None
    with torch.no_grad():
        if storage == "peft":
            _check_names(path, saved, get_peft_model_state_dict(model))
            set_peft_model_state_dict(model, saved)
            return
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        _check_names(path, saved, params)
        for name, value in saved.items():
            params[name].copy_(value)


def keep_start(run: RunDir, directory: Path) -> None:
    """Copy the starting adapter into the run (`start_adapter/`)."""
    from finlora.training.run_files import save_dir

    save_dir(start_adapter(run), lambda tmp: shutil.copytree(directory, tmp, dirs_exist_ok=True))
