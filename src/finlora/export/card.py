"""The model card (README.md) written with an hf or GGUF export, and the Ollama Modelfile
beside a GGUF: what the export is, how it was made and scored, and how to use it. The card's
text is a template file (templates/model_card.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from finlora import atomic
from finlora.export.load import ExportContext
from finlora.export.options import ExportOptions, Verification
from finlora.export.records import run_manifest, test_metrics
from finlora.export.usage import modelfile, template, use_section

CARD = "README.md"
MODELFILE = "Modelfile"
WITH_CARD = ("hf", "gguf")  # state_dict is weights alone: its record says what they are


def write_usage(
    ctx: ExportContext, options: ExportOptions, v: Verification, tmp: Path, files: list[str]
) -> list[str]:
    """Write the card (and a GGUF's Modelfile) into `tmp` beside `files`; their names.

    Written after the verification, whose figures the card quotes."""
    if options.format not in WITH_CARD:
        return []
    gguf = files[0] if options.format == "gguf" else None
    atomic.write_text(tmp / CARD, model_card(ctx, options, v, gguf))
    if gguf is None:
        return [CARD]
    atomic.write_text(tmp / MODELFILE, modelfile(ctx, gguf))
    return [CARD, MODELFILE]


def model_card(
    ctx: ExportContext, options: ExportOptions, v: Verification, gguf: str | None = None
) -> str:
    """README.md: what the export is, how it was made and scored, and how to use it."""
    manifest = run_manifest(ctx.run.dir)
    classify = ctx.cfg.task == "classify"
    # Only an encoder export is a pipeline("text-classification") model; a causal or seq2seq
    # classifier is a language model that writes the label word.
    encoder = ctx.kind == "encoder"
    tags = (
        f"financial-sentiment{', text-classification' if encoder else ''}"
        if classify
        else "instruction-tuning"
    )
    data = [f"- {manifest.get('data', {}).get('description', ctx.cfg.data.path)}"]
    if classify:
        data.append(f"- labels: {', '.join(ctx.label_codec.labels)}")
    return template("model_card.md").substitute(
        library="gguf" if gguf else "transformers",
        tags=f"{tags}, gguf" if gguf else tags,
        run_name=ctx.run.root.name,
        run=ctx.run.root,
        format=options.format,
        base_name=ctx.base_name,
        method=ctx.method,
        dtype=options.tensor_type if gguf else options.weights_dtype,
        what_it_is=_what_it_is(gguf),
        method_settings=_method_section(ctx),
        seed=ctx.cfg.seed,
        steps=manifest.get("steps", "?"),
        precision=manifest.get("precision", "?"),
        data="\n".join(data),
        metrics=_card_metrics(ctx),
        use=use_section(ctx, gguf),
        verification=_verification_line(v) + _gguf_line(v, gguf),
        manifest=json.dumps(manifest, indent=2),
    )


def _what_it_is(gguf: str | None) -> str:
    if gguf is None:
        return "The adapter is added into the base weights, so this loads with plain transformers."
    return (
        f"The adapter is added into the base weights, written as one GGUF file, `{gguf}`, for\n"
        "llama.cpp and the programs built on it (llama-cpp-python, Ollama)."
    )


def _method_section(ctx: ExportContext) -> str:
    section = getattr(ctx.cfg, ctx.method.lower(), None)
    try:
        return json.dumps(asdict(section))  # type: ignore[arg-type]
    except TypeError:
        return "(see config.yaml of the run)"


def _card_metrics(ctx: ExportContext) -> str:
    metrics = test_metrics(ctx)
    if not metrics:
        return f"not measured yet (`finlora eval {ctx.run.root}`)"
    if metrics.get("task") == "preference":
        return (
            f"reward accuracy {metrics['reward_accuracy']:.4f}, log-prob accuracy "
            f"{metrics['logp_accuracy']:.4f} (starting model "
            f"{metrics['start_logp_accuracy']:.4f}), chosen-answer perplexity "
            f"{metrics['chosen_perplexity']:.3f}, n {metrics['n']} ({metrics.get('data', '')})"
        )
    if metrics.get("task") == "instruct":
        return (
            f"perplexity {metrics['perplexity']:.3f}, BLEU {metrics['bleu']:.2f}, "
            f"ROUGE-L {metrics['rougeL']:.4f}, n {metrics['n']} ({metrics.get('data', '')})"
        )
    return (
        f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
        f"n {metrics['n']} ({metrics.get('data', '')})"
    )


def _verification_line(v: Verification) -> str:
    if v.max_abs_logit_diff is None:
        return "Not verified (exported with --no-verify)."
    if v.token_agreement is not None:
        return (
            f"On the {v.answer_tokens} answer tokens of {v.n} records ({v.data}), teacher-forced, "
            f"the exported weights give logits within {v.max_abs_logit_diff:.3g} of the adapter "
            f"model's (tolerance {v.tolerance:g}); the most likely next token agrees on "
            f"{v.token_agreement:.1%}."
        )
    line = (
        f"On {v.n} sentences ({v.data}) the exported weights give logits within "
        f"{v.max_abs_logit_diff:.3g} of the adapter model's (tolerance {v.tolerance:g}); "
        f"labels agree on {v.label_agreement:.1%}"
    )
    return line + (f", accuracy {v.accuracy:.4f}." if v.accuracy is not None else ".")


def _gguf_line(v: Verification, gguf: str | None) -> str:
    if gguf is None or v.max_abs_logit_diff is None:
        return ""
    if not v.gguf_checked:
        return f" The GGUF file itself was not checked in llama.cpp ({v.gguf_note})."
    unit, agreeing = (
        ("records", "next tokens") if v.token_agreement is not None else ("sentences", "labels")
    )
    return (
        f" Those are the merged weights before GGUF conversion; in llama.cpp the GGUF gives the "
        f"adapter model's {agreeing} on {v.gguf_agreement:.1%} of {v.gguf_n} {unit}."
    )
