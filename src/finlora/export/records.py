"""What an export records beside its model: finlora_export.json, and the run facts it quotes."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from finlora.export.load import ExportContext
from finlora.export.options import ExportOptions, Verification
from finlora.runs import Manifest, RunDir

EXPORT_RECORD = "finlora_export.json"


def run_manifest(run: RunDir) -> dict[str, Any]:
    """The run's manifest as plain data ({} for a run stopped before writing one)."""
    manifest = Manifest.read(run.manifest)
    return manifest.to_dict() if manifest is not None else {}


def test_metrics(ctx: ExportContext) -> dict[str, Any] | None:
    path = ctx.run.dir.eval_dir / "test.json"
    metrics = ctx.run.dir.read_json(path) if path.is_file() else None
    # Before eval named its --data reports apart, a file called test.csv wrote this one.
    if not isinstance(metrics, dict) or not str(metrics.get("data", "")).startswith("test split"):
        return None
    return metrics


def export_record(
    ctx: ExportContext, options: ExportOptions, files: list[str], v: Verification
) -> Any:
    return {
        "finlora_export": 1,
        "run": str(ctx.run.root),
        "format": options.format,
        "dtype": options.tensor_type if options.format == "gguf" else options.weights_dtype,
        "files": files,
        "method": ctx.cfg.method.name,
        "task": ctx.cfg.task,
        **_prompt_record(ctx),
        "verification": asdict(v),
        "manifest": run_manifest(ctx.run.dir),
    }


def _prompt_record(ctx: ExportContext) -> dict[str, Any]:
    """How to prompt the exported model: the label prompt, or the instruction template."""
    if ctx.kind == "encoder":  # no prompt: the sentence itself, one head logit per label
        return {"labels": ctx.label_codec.labels}
    if ctx.cfg.task == "classify":
        codec = ctx.label_codec
        before, after = codec.prompt_ids
        return {
            "labels": codec.labels,
            "prompt": codec.template.prompt,
            "label_prefix": codec.template.label_prefix,
            # The text is tokenized on its own, between the ids of the prompt's two parts (each
            # tokenized alone, no special tokens): the whole prompt as one string can tokenize
            # differently where the text meets them.
            "prompt_ids": {"before_text": before, "after_text": after},
            "label_ids": codec.label_ids,
        }
    template = ctx.instruct_codec.template
    if template.is_chat:
        return {"template": "chat"}  # the tokenizer's own, written with the model
    return {
        "template": template.name,
        "prompt_input": template.prompt_input,
        "prompt_no_input": template.prompt_no_input,
    }
