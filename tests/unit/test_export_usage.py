"""An export says how to use it: the Python snippet in its README runs as written, from the
export directory, and prints the label the run itself predicts; a GGUF gets llama.cpp and Ollama
commands and a Modelfile."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_export import export

from finlora.config import load_config
from finlora.export.usage import EXAMPLE_TEXT, modelfile, ollama_name
from finlora.inference import load_run
from finlora.prompts import InstructTemplate
from finlora.train import train

# SmolLM2's chat template, shortened: ChatML with a default system turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_run(overrides: list[str], where: Path) -> Path:
    cfg = load_config(None, [*overrides, "train.max_steps=6", "train.learning_rate=0.01"])
    train(cfg, where, progress_bar=False, log=lambda _msg: None)
    return where


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    return train_run(tiny_overrides, tmp_path_factory.mktemp("usage") / "run")


def use_section(card: str) -> str:
    return card.split("## Use\n", 1)[1].split("\n## ", 1)[0]


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", use_section(card), flags=re.S)


def run_snippet(code: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def runs_own_label(run: Path) -> str:
    return load_run(run).predict([EXAMPLE_TEXT], progress=False)[0].label


def test_hf_card_snippet_prints_the_runs_label(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    export(run_dir, "hf", out)
    card = (out / "README.md").read_text()
    use = use_section(card)
    assert "Financial news: {text}\nSentiment (negative, neutral, positive):" in use
    assert "`' negative'` [" in use and "gives free text, not labels" in use
    (snippet,) = python_blocks(card)
    assert "AutoModelForCausalLM" in snippet and repr(EXAMPLE_TEXT) in snippet
    assert run_snippet(snippet, out) == runs_own_label(run_dir)
    assert not (out / "Modelfile").exists()


def test_seq2seq_card_snippet_prints_the_runs_label(
    tiny_overrides: list[str], tiny_seq2seq_dir: Path, tmp_path: Path
) -> None:
    """Labels of two tokens (the word and </s>), scored as decoder targets."""
    shared = [o for o in tiny_overrides if not o.startswith("model.")]
    run = train_run([*shared, f"model.name={tiny_seq2seq_dir}"], tmp_path / "run")
    out = tmp_path / "hf"
    export(run, "hf", out)
    (snippet,) = python_blocks((out / "README.md").read_text())
    assert "AutoModelForSeq2SeqLM" in snippet
    assert run_snippet(snippet, out) == runs_own_label(run)


def test_gguf_card_snippet_and_commands(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    out = tmp_path / "gguf"
    result = export(run_dir, "gguf", out, dtype="f32")
    assert result.files == ["Modelfile", "README.md", "finlora_export.json", "run-f32.gguf"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: gguf\n")
    (snippet,) = python_blocks(card)
    assert "logits_all=True" in snippet and "'run-f32.gguf'" in snippet
    assert run_snippet(snippet, out) == runs_own_label(run_dir)
    use = use_section(card)
    assert "llama-cli -m run-f32.gguf -no-cnv --temp 0 -n 1 -p $'Financial news: " in use
    assert "ollama create run -f Modelfile" in use and "ollama run run 'Operating" in use
    assert (out / "Modelfile").read_text() == (
        "# ollama create run -f Modelfile\n"
        "FROM ./run-f32.gguf\n"
        'TEMPLATE """Financial news: {{ .Prompt }}\nSentiment (negative, neutral, positive):"""\n'
        "PARAMETER temperature 0\n"
        "PARAMETER num_predict 1\n"
    )


def test_chatml_modelfile_keeps_the_default_system_turn(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    ctx = SimpleNamespace(
        cfg=SimpleNamespace(task="instruct"),
        instruct_codec=SimpleNamespace(template=InstructTemplate.load("chat")),
        tokenizer=tokenizer,
        run=SimpleNamespace(root=Path("runs/FPB chat")),
    )
    text = modelfile(ctx, "fpb-chat-q8_0.gguf")  # type: ignore[arg-type]
    lines = text.splitlines()
    assert lines[:3] == [
        "# ollama create fpb-chat -f Modelfile",
        "FROM ./fpb-chat-q8_0.gguf",
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""',
    ]
    assert lines[3].startswith('TEMPLATE """{{- if .System }}<|im_start|>system')
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text
    assert text.endswith(
        '<|im_start|>assistant\n"""\nPARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n'
    )


def test_ollama_names() -> None:
    assert ollama_name("FPB SmolLM2 (lora)") == "fpb-smollm2-lora"
    assert ollama_name("___") == "finlora-export"
