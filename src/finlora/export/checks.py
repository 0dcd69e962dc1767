"""Checks before any work: a run with a weight update to merge, and an --out that can be written."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from finlora import atomic
from finlora.errors import FinloraError
from finlora.export.load import WEIGHT_METHODS
from finlora.export.records import EXPORT_RECORD, run_manifest
from finlora.methods.storage import TENSORS_FILE
from finlora.runs import RunDir

# Methods that add virtual tokens to the input instead of an update to a weight matrix.
UNMERGEABLE = {
    "PREFIX_TUNING": "prefix tuning",
    "PROMPT_TUNING": "prompt tuning",
    "P_TUNING": "P-tuning",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
    "ADAPTION_PROMPT": "adaption prompt",
}


# Methods outside PEFT whose update is no change of weights.
NONLINEAR = {"adapter": "bottleneck adapters"}


def _peft_type(run: RunDir) -> str:
    path = run.adapter / "adapter_config.json"
    if not path.is_file():
        method = run.read_json(run.adapter / "finlora_method.json").get("method", "?")
        if method in NONLINEAR:
            raise FinloraError(
                f"{run.root}: {NONLINEAR[method]} cannot be merged into the model's weights "
                "(each adds a non-linear layer, up(f(down(h))), to the blocks); the run stays "
                "usable with `finlora predict` and `finlora eval`"
            )
        if method not in WEIGHT_METHODS:
            raise FinloraError(f"{run.root}: method {method!r} has no adapter finlora can export")
        return WEIGHT_METHODS[method]
    return str(run.read_json(path).get("peft_type", "LORA")).upper()


def check_mergeable(run: RunDir) -> str:
    """The run's PEFT method; FinloraError for one that has no weight update to merge."""
    peft_type = _peft_type(run)
    if peft_type in UNMERGEABLE:
        raise FinloraError(
            f"{run.root}: {UNMERGEABLE[peft_type]} cannot be merged into the model's weights "
            "(it adds learned virtual tokens to the input, not a weight update); its adapter "
            "stays usable with `finlora predict` and `finlora eval`"
        )
    return peft_type


def check_adapter_not_empty(run: RunDir) -> None:
    """Refuse an adapter whose update is all zeros (untrained, or saved empty)."""
    path = run.adapter / "adapter_model.safetensors"
    if not path.is_file():
        path = run.adapter / TENSORS_FILE  # freeze / full: the tuned weights themselves
    if not path.is_file():
        raise FinloraError(f"{run.adapter}: no adapter weights (adapter_model.safetensors)")
    with safe_open(str(path), framework="pt") as fh:
        names = list(fh.keys())
        # LoRA starts B at zero, so a zero B means no update whatever A holds.
        watched = [n for n in names if "lora_B" in n] or names
        if not watched:
            raise FinloraError(f"{path}: the adapter holds no tensors")
        if all(not fh.get_tensor(n).any() for n in watched):
            raise FinloraError(
                f"{path}: all {len(watched)} adapter tensors ({watched[0]}, ...) are zero; "
                "the adapter holds no update and a merge would export the base model unchanged"
            )


def check_gguf_kind(run: RunDir) -> None:
    """Refuse GGUF for a run of a seq2seq or encoder model, from the kind its manifest records
    (before the model loads). A run without one meets the GGUF writer's own architecture check."""
    kind = run_manifest(run).get("base_model", {}).get("kind", "causal")
    if kind != "causal":
        raise FinloraError(
            f"GGUF export covers causal (Llama) models; export {kind} models with --format hf"
        )


def check_out(run: RunDir, out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that would swallow the run, one that --overwrite
    would take from something other than an earlier export, or one that cannot be written."""
    root, target = run.root.resolve(), out.resolve()
    if target == root or root.is_relative_to(target):
        raise FinloraError(f"--out {out}: would replace the run {run.root}; name another folder")
    atomic.check_new_dir(out, overwrite)
    if overwrite and out.is_dir() and any(out.iterdir()) and not (out / EXPORT_RECORD).is_file():
        raise FinloraError(
            f"{out}: holds no {EXPORT_RECORD}, so it is no finlora export and --overwrite "
            "leaves it alone (remove it yourself or name another folder)"
        )
    atomic.check_can_create(out)
