"""The model card (README.md) written with an export: what it is, how it was made and scored,
and how to use it. The card's text is a template file (templates/model_card.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import resources
from string import Template

from finlora.export.load import ExportContext
from finlora.export.options import ExportOptions, Verification
from finlora.export.records import run_manifest, test_metrics


def _template(name: str) -> Template:
    return Template((resources.files("finlora.export") / "templates" / name).read_text("utf-8"))


def model_card(ctx: ExportContext, options: ExportOptions, v: Verification) -> str:
    """README.md for the hf export: what it is, how it was made and scored, and how to use it."""
    manifest = run_manifest(ctx.run)
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
        data.append(f"- labels: {', '.join(ctx.codec.labels)}")
    use = _card_use_labels(ctx) if classify else _card_use_instructions(ctx)
    return _template("model_card.md").substitute(
        tags=tags,
        run_name=ctx.run.root.name,
        run=ctx.run.root,
        base_name=ctx.base_name,
        method=ctx.method,
        dtype=options.weights_dtype,
        method_settings=_method_section(ctx),
        seed=ctx.cfg.seed,
        steps=manifest.get("steps", "?"),
        precision=manifest.get("precision", "?"),
        data="\n".join(data),
        metrics=_card_metrics(ctx),
        use="\n".join(use),
        verification=_verification_line(v),
        manifest=json.dumps(manifest, indent=2),
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
    if metrics.get("task") == "instruct":
        return (
            f"perplexity {metrics['perplexity']:.3f}, BLEU {metrics['bleu']:.2f}, "
            f"ROUGE-L {metrics['rougeL']:.4f}, n {metrics['n']} ({metrics.get('data', '')})"
        )
    return (
        f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
        f"n {metrics['n']} ({metrics.get('data', '')})"
    )


def _card_use_labels(ctx: ExportContext) -> list[str]:
    if ctx.kind == "encoder":
        return [
            "A sequence classifier with one logit per label (`config.id2label`); it reads the",
            "bare sentence:",
            "",
            "```python",
            "from transformers import pipeline",
            "",
            'classify = pipeline("text-classification", model="path/to/this/directory")',
            'classify("Operating profit rose to EUR 13.1 mn from EUR 8.7 mn.")',
            "```",
        ]
    before, after = ctx.codec.template.parts(ctx.codec.labels)
    labels = ", ".join(f"`{ctx.codec.template.verbalize(label)}`" for label in ctx.codec.labels)
    return [
        "A sentence is classified by comparing the likelihood of each label's tokens after the",
        f"prompt `{json.dumps(before + '{text}' + after)}`; the label tokens are {labels}.",
        "Tokenize as finlora does, in three pieces, or the scores can shift slightly where the",
        "text meets the prompt:",
        "",
        "```python",
        "ids = (tokenizer(before, add_special_tokens=False).input_ids",
        "       + tokenizer(text, add_special_tokens=False).input_ids",
        "       + tokenizer(after, add_special_tokens=False).input_ids)",
        "```",
        "",
        "(`before` and `after` are the prompt's parts around `{text}`; their ids, and the",
        "labels', are `prompt_ids` and `label_ids` in `finlora_export.json`.)",
    ]


def _card_use_instructions(ctx: ExportContext) -> list[str]:
    template = ctx.codec.template
    if template.is_chat:
        return [
            "Trained on conversations rendered with the tokenizer's own chat template (saved",
            "with it): use `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.",
        ]
    return [
        f"Trained on the `{template.name}` prompt; an instruction with an input reads",
        "",
        "```text",
        template.prompt_input,
        "```",
        "",
        "and one without",
        "",
        "```text",
        template.prompt_no_input,
        "```",
    ]


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
