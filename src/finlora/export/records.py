"""What an export records beside its model: finlora_export.json, and the run facts it quotes."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from finlora.export.load import ExportContext
from finlora.export.options import ExportOptions, Verification
from finlora.runs import RunDir

EXPORT_RECORD = "finlora_export.json"


def run_manifest(run: RunDir) -> dict[str, Any]:
    return run.read_json(run.manifest) if run.manifest.is_file() else {}


def test_metrics(ctx: ExportContext) -> dict[str, Any] | None:
    path = ctx.run.eval_dir / "test.json"
    metrics = ctx.run.read_json(path) if path.is_file() else None
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
        "manifest": run_manifest(ctx.run),
    }


def _prompt_record(ctx: ExportContext) -> dict[str, Any]:
    """How to prompt the exported model: the label prompt, or the instruction template."""
    template = ctx.codec.template
    if ctx.kind == "encoder":  # no prompt: the sentence itself, one head logit per label
        return {"labels": ctx.codec.labels}
    if ctx.cfg.task == "classify":
        before, after = ctx.codec.prompt_ids
        return {
            "labels": ctx.codec.labels,
            "prompt": template.prompt,
            "label_prefix": template.label_prefix,
            # The text is tokenized on its own, between the ids of the prompt's two parts (each
            # tokenized alone, no special tokens): the whole prompt as one string can tokenize
            # differently where the text meets them.
            "prompt_ids": {"before_text": before, "after_text": after},
            "label_ids": ctx.codec.label_ids,
        }
    if template.is_chat:
        return {"template": "chat"}  # the tokenizer's own, written with the model
    return {
        "template": template.name,
        "prompt_input": template.prompt_input,
        "prompt_no_input": template.prompt_no_input,
    }
