"""The commands that answer with an instruct run: `generate` (one instruction) and `chat`."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from finlora.cli.options import (
    as_json_option,
    echo_err,
    run_dir_argument,
    speed_option,
    trust_remote_code_option,
    zero_shot_option,
)
from finlora.errors import FinloraError


def _generation_options(fn: Any) -> Any:
    """The decoding options of generate and chat, handed to the command as `options`, and
    the options of loading their run (`--system`, `--zero-shot`, `--set`, `--trust-remote-code`)."""
    options = [
        click.option(
            "--max-new-tokens",
            default=256,
            show_default=True,
            help="Longest answer in tokens (at most 4096).",
        ),
        click.option(
            "--temperature",
            default=0.0,
            show_default=True,
            help="0 decodes greedily; above 0 samples.",
        ),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--top-k", default=0, show_default=True, help="Sample the k best (0: all)."),
        click.option(
            "--seed",
            type=click.IntRange(0, 2**32 - 1),
            help="Seed for sampling, for repeatable answers.",
        ),
        click.option("--system", help="A system message (chat template runs)."),
        zero_shot_option(),
        speed_option,
        trust_remote_code_option,
    ]

    @functools.wraps(fn)
    def command(
        *args: Any,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        **kwargs: Any,
    ) -> Any:
        from finlora.generate import GenerationOptions

        options = GenerationOptions(max_new_tokens, temperature, top_p, top_k, seed)
        return fn(*args, options=options, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def _load_instruct_run(run_dir: Path, zero_shot: bool, trust: bool, speed: Sequence[str]) -> Any:
    from finlora.inference import load_run, require_task

    run = require_task(run_dir, "instruct", "finlora predict", speed)
    return load_run(run, zero_shot=zero_shot, trust_remote_code=trust)


def _note_no_system(loaded: Any, system: str | None) -> None:
    if system and not loaded.codec.template.is_chat:
        echo_err(
            f"note: the {loaded.codec.template.name} template has no system prompt; "
            "--system is not used"
        )


def _stdout_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@click.command()
@run_dir_argument
@click.option("--instruction", required=True, help="What to do.")
@click.option("--input", "input_text", default="", help="The text or figures to work on.")
@as_json_option("Print one JSON object instead of streaming.")
@_generation_options
def generate(
    run_dir: Path,
    instruction: str,
    input_text: str,
    as_json: bool,
    options: Any,
    system: str | None,
    zero_shot: bool,
    speed: tuple[str, ...],
    trust_remote_code: bool,
) -> None:
    """Answer one instruction with an instruct run, streaming the answer as it is generated.

    \b
    Example:
      finlora generate runs/fin-instruct --instruction "What is EBITDA?"
      finlora generate runs/fin-instruct --instruction "Compute the P/E ratio." \\
          --input "Share price EUR 42.00, EPS EUR 3.50."
    """
    from finlora.chat import answer, instruction_prompt
    from finlora.data.textfile import from_terminal
    from finlora.labelling import note_overflow

    instruction, input_text = from_terminal(instruction), from_terminal(input_text)
    system = None if system is None else from_terminal(system)
    if not instruction.strip():
        raise FinloraError("--instruction is empty")
    loaded = _load_instruct_run(run_dir, zero_shot, trust_remote_code, speed)
    _note_no_system(loaded, system)
    prompt = instruction_prompt(loaded, instruction, input_text, system, options.max_new_tokens)
    note_overflow(loaded.codec, 1, "prompt(s)", echo_err)
    if as_json:
        reply = answer(loaded, prompt, options, lambda _: None)
        finish = "length" if reply.hit_limit else "stop"  # as the server's finish_reason
        click.echo(json.dumps({"instruction": instruction, "input": input_text,
                               "answer": reply.text, "finish_reason": finish}))  # fmt: skip
        return
    answer(loaded, prompt, options, _stdout_stream)
    click.echo()


def _read_line(prompt: str) -> str:
    from finlora.data.textfile import from_terminal

    return from_terminal(input(prompt))


@click.command()
@run_dir_argument
@_generation_options
def chat(
    run_dir: Path,
    options: Any,
    system: str | None,
    zero_shot: bool,
    speed: tuple[str, ...],
    trust_remote_code: bool,
) -> None:
    """Chat with an instruct run in the terminal; answers stream as they are generated.

    \b
    Example:
      finlora chat runs/fin-instruct
      finlora chat runs/fin-instruct --temperature 0.7 --top-p 0.9
    """
    from finlora.chat import ChatSession, chat_loop, describe
    from finlora.data.textfile import from_terminal

    system = None if system is None else from_terminal(system)
    loaded = _load_instruct_run(run_dir, zero_shot, trust_remote_code, speed)
    echo_err(describe(loaded))
    _note_no_system(loaded, system)
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (line editing and history for input())
    chat_loop(ChatSession(loaded, options, system), _read_line, _stdout_stream)
