"""Instruction data: Alpaca, OpenAI `messages` and ShareGPT `conversations` records, read from
JSON or JSON Lines.

Three record shapes, told apart per record by their keys (a file may mix them):
  Alpaca:   {"instruction": str, "input": str (optional), "output": str}
  OpenAI:   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
The two chat shapes become the same conversation (human is the user, gpt the assistant).
Any may carry "label": the answer's label (e.g. a sentiment), which lets `finlora eval` check
that a generated answer names exactly one valid label; "labels" may list the valid ones.

Every problem is one `FinloraError` naming the file and line of the record (and its number in
a JSON list, where records share a line), and it is raised while loading, so training never
starts on a malformed file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finlora import atomic
from finlora.data.textfile import json_array, json_lines, read_text
from finlora.errors import FinloraError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class InstructRecord:
    """One training conversation. An Alpaca record is a user turn and an assistant turn."""

    messages: tuple[Message, ...]
    source: str  # "file:line", or "finlora:<set>:<i>" for generated records
    # Alpaca fields, kept so the Alpaca template can place them; None for chat records.
    instruction: str | None = None
    input: str = ""
    label: str | None = None
    labels: tuple[str, ...] = ()

    @property
    def response(self) -> str:
        """The last assistant turn: what the model must produce (and is scored on)."""
        return self.messages[-1].content

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        return self.messages[:-1]


def alpaca_record(
    instruction: str,
    output: str,
    input: str = "",
    source: str = "",
    label: str | None = None,
    labels: tuple[str, ...] = (),
) -> InstructRecord:
    """The record for one Alpaca triple; the chat form joins instruction and input."""
    user = f"{instruction}\n\n{input}" if input else instruction
    return InstructRecord(
        (Message("user", user), Message("assistant", output)),
        source,
        instruction=instruction,
        input=input,
        label=label,
        labels=labels,
    )


def _text(where: str, record: dict[str, Any], key: str, *, required: bool) -> str:
    if key not in record:
        if required:
            raise FinloraError(f"{where}: missing '{key}'")
        return ""
    value = record[key]
    if value is None and not required:
        return ""  # exports often write "input": null for "no input"
    if not isinstance(value, str):
        raise FinloraError(f"{where}: '{key}' must be a string (got {type(value).__name__})")
    if required and not value.strip():
        raise FinloraError(f"{where}: empty '{key}'")
    return value


def _label_fields(where: str, record: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    label = record.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise FinloraError(f"{where}: 'label' must be a non-empty string")
    labels = record.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise FinloraError(f"{where}: 'labels' must be a list of non-empty strings")
    if label is not None and labels and label not in labels:
        raise FinloraError(f"{where}: label {label!r} is not in its 'labels' {labels}")
    return label, tuple(labels)


@dataclass(frozen=True)
class ChatShape:
    """How one chat format writes a conversation: its list, and each turn's speaker and text."""

    key: str  # the record's list of turns
    speaker: str  # a turn's key naming who speaks
    text: str  # a turn's key holding what is said
    roles: dict[str, str]  # the format's speaker names -> system, user, assistant

    def name(self, role: str) -> str:
        """The format's own name for `role`, for messages a user can act on."""
        return next(k for k, v in self.roles.items() if v == role)


OPENAI = ChatShape("messages", "role", "content", {r: r for r in ROLES})
SHAREGPT = ChatShape(
    "conversations", "from", "value", {"system": "system", "human": "user", "gpt": "assistant"}
)
CHAT_SHAPES = (OPENAI, SHAREGPT)


def _turn(at: str, shape: ChatShape, raw: Any, first: bool) -> Message:
    if not isinstance(raw, dict):
        raise FinloraError(f"{at} must be an object with '{shape.speaker}' and '{shape.text}'")
    speaker = raw.get(shape.speaker)
    if speaker not in shape.roles:
        allowed = ", ".join(shape.roles)
        raise FinloraError(f"{at}: {shape.speaker} must be one of {allowed} (got {speaker!r})")
    role = shape.roles[speaker]
    if role == "system" and not first:
        raise FinloraError(f"{at}: a {speaker} message may only come first")
    return Message(role, _text(at, raw, shape.text, required=True))


def _chat(where: str, record: dict[str, Any], shape: ChatShape) -> InstructRecord:
    raw = record[shape.key]
    if not isinstance(raw, list) or not raw:
        raise FinloraError(f"{where}: '{shape.key}' must be a non-empty list")
    messages = [_turn(f"{where}: {shape.key}[{i}]", shape, m, i == 0) for i, m in enumerate(raw)]
    user, assistant = shape.name("user"), shape.name("assistant")
    turns = [m.role for m in messages if m.role != "system"]
    if not turns or turns[-1] != "assistant":
        raise FinloraError(f"{where}: the last message must be the {assistant}'s answer")
    if turns[0] != "user" or any(a == b for a, b in zip(turns, turns[1:], strict=False)):
        raise FinloraError(
            f"{where}: turns must alternate {user}, {assistant}, starting with {user}"
        )
    label, labels = _label_fields(where, record)
    return InstructRecord(tuple(messages), where, label=label, labels=labels)


def parse_record(where: str, record: Any) -> InstructRecord:
    """Validate one decoded record (Alpaca, OpenAI or ShareGPT); raises FinloraError naming
    `where`."""
    if not isinstance(record, dict):
        raise FinloraError(f"{where}: expected an object, got {type(record).__name__}")
    for shape in CHAT_SHAPES:
        if shape.key in record:
            return _chat(where, record, shape)
    if "instruction" not in record and "output" not in record:
        raise FinloraError(
            f"{where}: neither an Alpaca record (instruction, input, output) "
            "nor a chat record (messages, or ShareGPT's conversations)"
        )
    instruction = _text(where, record, "instruction", required=True)
    output = _text(where, record, "output", required=True)
    input_text = _text(where, record, "input", required=False)
    label, labels = _label_fields(where, record)
    return alpaca_record(instruction, output, input_text, where, label, labels)


def load_instruct(path: Path) -> list[InstructRecord]:
    """Records from a .json list or a .jsonl file, each of any of the three shapes; raises
    FinloraError on the first bad one."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FinloraError(f"{path}: is a directory; give an instruction .json or .jsonl file")
    text = read_text(path)
    stripped = text.lstrip()
    rows = list(json_array(path, text) if stripped.startswith("[") else json_lines(path, text))
    # A JSON list written on one line puts every record on line 1: its number tells them apart.
    shared = Counter(line for line, _ in rows)
    records = [
        parse_record(f"{path}:{line}" + (f" (record {n})" if shared[line] > 1 else ""), record)
        for n, (line, record) in enumerate(rows, start=1)
    ]
    if not records:
        raise FinloraError(f"{path}: no instruction records")
    return records


def write_jsonl(records: list[InstructRecord], path: Path) -> None:
    """Write records back as JSON Lines, Alpaca where they came from Alpaca, else chat
    (`messages`, whichever chat shape they were read from)."""
    lines = []
    for r in records:
        row: dict[str, Any]
        if r.instruction is not None:
            row = {"instruction": r.instruction, "input": r.input, "output": r.response}
        else:
            row = {"messages": [{"role": m.role, "content": m.content} for m in r.messages]}
        if r.label is not None:
            row["label"] = r.label
        if r.labels:
            row["labels"] = list(r.labels)
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic.write_text(path, "\n".join(lines) + "\n")
