"""Talking to an instruct run: one answer (`finlora generate`) or a chat loop (`finlora chat`).

The conversation is kept as messages and rendered with the run's template on every turn: the
model's own chat template (the whole conversation), or the Alpaca template (the latest message
only, since it has no turns). Answers stream to the terminal as tokens arrive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from finlora.data.instruct import Message, alpaca_record
from finlora.generate import GenerationOptions, Reply, position_limit, stream_reply
from finlora.inference import LoadedRun

Write = Callable[[str], None]

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits."


def instruction_prompt(
    loaded: LoadedRun,
    instruction: str,
    input_text: str = "",
    system: str | None = None,
    max_new_tokens: int = 0,
) -> list[int]:
    """The prompt tokens for one instruction (and optional input) in the run's template, cut to
    leave room for an answer of `max_new_tokens` (see prompt_budget)."""
    record = alpaca_record(instruction, "", input_text)
    if system:
        record = dataclasses.replace(record, messages=(Message("system", system), *record.messages))
    return loaded.instruct_codec.generation_prompt(record, prompt_budget(loaded, max_new_tokens))


def prompt_budget(loaded: LoadedRun, max_new_tokens: int) -> int:
    """Prompt tokens that leave an answer of `max_new_tokens` room in the model's positions,
    though never less than half of them: a prompt cut to data.max_length can fill a model
    whose positions data.max_length reaches, and nothing would be left to answer in."""
    limit = _context_limit(loaded)
    return limit - min(max_new_tokens, limit // 2)


def answer(loaded: LoadedRun, prompt: list[int], options: GenerationOptions, write: Write) -> Reply:
    return stream_reply(
        loaded.model,
        loaded.instruct_codec.tokenizer,
        prompt,
        options,
        write,
        device=loaded.device,
        dtype=loaded.dtype,
    )


def _context_limit(loaded: LoadedRun) -> int:
    # A model without a fixed limit (T5's relative positions) still reads prompts of bounded
    # length well: 2,048 tokens.
    return position_limit(loaded.model) or 2048


def fit_conversation(
    loaded: LoadedRun, head: list[Message], history: list[Message], max_new_tokens: int
) -> list[int]:
    """The prompt for `head` (system messages, always kept) and `history`, forgetting the oldest
    exchanges of `history` (in place) until the prompt leaves room for the answer in the model's
    context; the latest message is never dropped."""
    budget = _context_limit(loaded) - max_new_tokens
    while True:
        prompt = loaded.instruct_codec.chat_prompt([*head, *history])
        if len(prompt) <= budget or len(history) <= 1:
            return prompt
        del history[:2]


@dataclasses.dataclass
class ChatSession:
    loaded: LoadedRun
    options: GenerationOptions
    system: str | None = None
    history: list[Message] = dataclasses.field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def reply(self, text: str, write: Write) -> str:
        self.history.append(Message("user", text))
        head = [Message("system", self.system)] if self.system else []
        prompt = fit_conversation(self.loaded, head, self.history, self.options.max_new_tokens)
        said = answer(self.loaded, prompt, self.options, write).text
        self.history.append(Message("assistant", said))
        return said


def chat_loop(session: ChatSession, read: Callable[[str], str], write: Write) -> None:
    """Read a line, stream the answer, repeat; ends at /exit, /quit or end of input."""
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            write("(new conversation)\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        write("assistant> ")
        session.reply(line, write)
        write("\n")


def describe(loaded: LoadedRun) -> str:
    template: Any = loaded.instruct_codec.template
    how = "the model's chat template" if template.is_chat else f"the {template.name} template"
    who = "base model (zero-shot)" if loaded.zero_shot else str(loaded.run.root)
    memory = "" if template.is_chat else "; each message is a new instruction (no history)"
    return f"finlora chat: {who}, {how}{memory}. {HELP}"
