"""How to use an export, as its README says: the prompt and label tokens with a snippet that
scores the labels (classification), the llama.cpp, llama-cpp-python and Ollama commands (GGUF),
and the Ollama Modelfile written beside a GGUF. The texts are template files (templates/)."""

from __future__ import annotations

import re
from importlib import resources
from string import Template
from typing import Any

from finlora.export.load import ExportContext

# Shown in every snippet and command: a sentence and an instruction the user replaces.
EXAMPLE_TEXT = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn."
EXAMPLE_INSTRUCTION = "What is EBITDA?"
SNIPPETS = {
    "causal": "score_labels_causal.py.tmpl",
    "seq2seq": "score_labels_seq2seq.py.tmpl",
    "gguf": "score_labels_llama_cpp.py.tmpl",
}
GENERATE_CTX = 2048  # llama.cpp context for an instruct GGUF: a prompt and its answer
# Ollama's ChatML template; a SYSTEM line, where the model's chat template adds a default system
# turn, gives the same first turn as training saw.
CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
    "{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"
)
CHATML_STOPS = ["<|im_start|>", "<|im_end|>"]


def template(name: str) -> Template:
    """A template file shipped in finlora/export/templates, `$name` placeholders."""
    return Template((resources.files("finlora.export") / "templates" / name).read_text("utf-8"))


def ollama_name(run_name: str) -> str:
    """A model name Ollama accepts: lower-case letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9._-]+", "-", run_name.lower()).strip("-._") or "finlora-export"


def use_section(ctx: ExportContext, gguf: str | None) -> str:
    """The card's `## Use` text for this run; `gguf`: the GGUF file's name, None for hf."""
    if ctx.cfg.task == "classify":
        if ctx.kind == "encoder":
            return template("use_encoder.md").substitute(text=repr(EXAMPLE_TEXT))
        return _use_labels(ctx, gguf)
    return _use_instructions(ctx) if gguf is None else _use_instruct_gguf(ctx, gguf)


def _use_labels(ctx: ExportContext, gguf: str | None) -> str:
    codec = ctx.label_codec
    before, after = codec.template.parts(codec.labels)
    label_ids = dict(zip(codec.labels, codec.label_ids, strict=True))
    words = [codec.template.verbalize(label) for label in codec.labels]
    snippet = template(SNIPPETS["gguf" if gguf else ctx.kind]).substitute(
        before=repr(before),
        after=repr(after),
        labels=_dict_literal(label_ids),
        text=repr(EXAMPLE_TEXT),
        gguf=repr(gguf),
        n_ctx=codec.max_length + 8,
    )
    text = template("use_labels.md").substitute(
        prompt=before + "{text}" + after,
        labels=", ".join(f"`{label}`" for label in codec.labels),
        label_tokens=", ".join(
            f"`{word!r}` {ids}" for word, ids in zip(words, codec.label_ids, strict=True)
        ),
        snippet=snippet.rstrip("\n"),
    )
    if gguf is None:
        return text.rstrip("\n")
    tools = template("use_labels_gguf_tools.md").substitute(
        gguf=gguf,
        n_predict=codec.max_label_len,
        example_prompt=_shell(before + EXAMPLE_TEXT + after),
        example_text=_shell(EXAMPLE_TEXT),
        ollama_name=ollama_name(ctx.run.root.name),
    )
    return f"{text}\n{tools}".rstrip("\n")


def _dict_literal(mapping: dict[str, list[int]]) -> str:
    rows = "".join(f"    {key!r}: {value},\n" for key, value in mapping.items())
    return "{\n" + rows + "}"


def _shell(text: str) -> str:
    """`text` as one shell word: single quotes, or bash's $'...' where it holds a newline."""
    if "\n" not in text and "\t" not in text:
        return "'" + text.replace("'", "'\\''") + "'"
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return "$'" + escaped.replace("\n", "\\n").replace("\t", "\\t") + "'"


def _use_instructions(ctx: ExportContext) -> str:
    prompt = ctx.instruct_codec.template
    if prompt.is_chat:
        return (
            "Trained on conversations rendered with the tokenizer's own chat template (saved\n"
            "with it): use `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`."
        )
    return (
        f"Trained on the `{prompt.name}` prompt; an instruction with an input reads\n\n"
        f"```text\n{prompt.prompt_input}\n```\n\nand one without\n\n"
        f"```text\n{prompt.prompt_no_input}\n```"
    )


def _use_instruct_gguf(ctx: ExportContext, gguf: str) -> str:
    prompt = ctx.instruct_codec.template
    values = {"gguf": repr(gguf), "n_ctx": GENERATE_CTX, "instruction": repr(EXAMPLE_INSTRUCTION)}
    if prompt.is_chat:
        snippet = template("generate_chat_llama_cpp.py.tmpl").substitute(values)
        cli = f"llama-cli -m {gguf} -cnv  # a conversation, in the chat template stored in the GGUF"
        flags, note = " --jinja", _chat_note(ctx.tokenizer)
    else:
        snippet = template("generate_prompt_llama_cpp.py.tmpl").substitute(
            values, prompt=repr(prompt.prompt_no_input), stop=repr(_stops(ctx))
        )
        filled = prompt.prompt(EXAMPLE_INSTRUCTION)
        cli = f"llama-cli -m {gguf} -no-cnv --temp 0 -n 256 -p {_shell(filled)}"
        flags, note = "", f"its template is the run's `{prompt.name}` prompt"
    return (
        template("use_instruct_gguf.md")
        .substitute(
            prompt_note=_use_instructions(ctx),
            llama_cli=cli,
            gguf=gguf,
            server_flags=flags,
            snippet=snippet.rstrip("\n"),
            modelfile_note=note,
            ollama_name=ollama_name(ctx.run.root.name),
            example_instruction=_shell(EXAMPLE_INSTRUCTION),
        )
        .rstrip("\n")
    )


def _chat_note(tokenizer: Any) -> str:
    if _is_chatml(tokenizer):
        return "its template is ChatML, as the model's chat template"
    return "Ollama reads the chat template stored in the GGUF where it recognises it"


def _stops(ctx: ExportContext) -> list[str]:
    eos = ctx.tokenizer.eos_token
    return [eos] if isinstance(eos, str) and eos else []


def _is_chatml(tokenizer: Any) -> bool:
    chat_template = getattr(tokenizer, "chat_template", None)
    return isinstance(chat_template, str) and "<|im_start|>" in chat_template


def _default_system(tokenizer: Any) -> str | None:
    """The system turn a ChatML chat template adds when the messages have none, if any."""
    head = "<|im_start|>system\n"
    from jinja2 import TemplateError

    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    except (TemplateError, ValueError, TypeError):  # a template that wants more than one turn
        return None
    if not isinstance(rendered, str) or not rendered.startswith(head):
        return None
    end = rendered.find("<|im_end|>")
    return rendered[len(head) : end] if end > 0 else None


def modelfile(ctx: ExportContext, gguf: str) -> str:
    """An Ollama Modelfile for the GGUF `gguf` beside it: the run's prompt as its template."""
    lines = [
        f"# ollama create {ollama_name(ctx.run.root.name)} -f Modelfile",
        f"FROM ./{gguf}",
    ]
    if ctx.cfg.task == "classify":
        before, after = ctx.label_codec.template.parts(ctx.label_codec.labels)
        lines += [
            f'TEMPLATE """{before}{{{{ .Prompt }}}}{after}"""',
            "PARAMETER temperature 0",
            f"PARAMETER num_predict {ctx.label_codec.max_label_len}",
        ]
    elif not ctx.instruct_codec.template.is_chat:
        no_input = ctx.instruct_codec.template.prompt_no_input
        prompt = no_input.replace("{instruction}", "{{ .Prompt }}")
        lines.append(f'TEMPLATE """{prompt}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in _stops(ctx)]
    elif _is_chatml(ctx.tokenizer):
        system = _default_system(ctx.tokenizer)
        lines += [f'SYSTEM """{system}"""'] if system else []
        lines.append(f'TEMPLATE """{CHATML}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in CHATML_STOPS]
    else:
        lines.append("# TEMPLATE: Ollama reads the chat template stored in the GGUF")
    return "\n".join(lines) + "\n"
