"""Preference data: a prompt with a chosen and a rejected answer (DPO, ORPO), or a prompt with one
answer marked desirable or not (KTO); read from JSON Lines or a JSON list.

Record shapes, per record (a file may mix the two prompt forms):
  pair:      {"prompt": str, "input": str (optional), "chosen": str, "rejected": str}
             {"messages": [... the conversation so far, ending with the user], "chosen": str,
              "rejected": str}
  unpaired:  the same prompt, with {"completion": str, "label": true | false} (KTO)
A string prompt is an Alpaca instruction (with its optional input); `messages` (or a list as
"prompt", TRL's conversational form) is rendered through the model's chat template. An answer
may also be TRL's one-message list, [{"role": "assistant", "content": str}].

A record becomes a `PreferenceRecord`: an instruction record of the prompt and its chosen answer
(or its completion), so every instruct path (prompt rendering, perplexity, generation, export
checks) reads it as such; the rejected answer and the KTO label ride along. Every problem is
one `FinloraError` naming the file and line, raised while loading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finlora import atomic
from finlora.config.preference import PAIRED_OBJECTIVES
from finlora.data.instruct import InstructRecord, parse_record
from finlora.data.textfile import json_array, json_lines, read_text
from finlora.errors import FinloraError


@dataclass(frozen=True)
class PreferenceRecord(InstructRecord):
    """The prompt and its chosen answer (or its KTO completion) as an instruction record, and
    the rejected answer of a pair, or whether an unpaired completion is desirable."""

    rejected: str | None = None  # pairs only
    desirable: bool | None = None  # unpaired (KTO) records only

    @property
    def paired(self) -> bool:
        return self.rejected is not None

    @property
    def answers(self) -> tuple[tuple[str, bool], ...]:
        """(answer, desirable) for each answer: chosen then rejected, or the one completion."""
        if self.rejected is not None:
            return ((self.response, True), (self.rejected, False))
        return ((self.response, bool(self.desirable)),)


def _answer(where: str, record: dict[str, Any], key: str) -> str:
    """A string answer, or TRL's one-message list holding the assistant's answer."""
    if key not in record:
        raise FinloraError(f"{where}: missing '{key}'")
    value = record[key]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role", "assistant") != "assistant":
            raise FinloraError(f"{where}: '{key}' must be the assistant's answer")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise FinloraError(
            f'{where}: \'{key}\' must be a string (or [{{"role": "assistant", "content": '
            f"...}}]), got {type(value).__name__}"
        )
    if not value.strip():
        raise FinloraError(f"{where}: empty '{key}'")
    return value


def _prompt(where: str, record: dict[str, Any], answer: str) -> InstructRecord:
    """The prompt with `answer` after it, validated as an instruction record."""
    key = "messages" if "messages" in record else "prompt"
    if key not in record:
        raise FinloraError(f"{where}: missing 'prompt' (or 'messages')")
    prompt = record[key]
    if isinstance(prompt, str):
        if key == "messages":
            raise FinloraError(f"{where}: 'messages' must be a list of messages")
        extra = {"input": record["input"]} if "input" in record else {}
        return parse_record(where, {"instruction": prompt, "output": answer, **extra})
    if not isinstance(prompt, list) or not prompt:
        raise FinloraError(f"{where}: '{key}' must be a string or a non-empty list of messages")
    if "input" in record:
        raise FinloraError(f"{where}: 'input' goes with a string prompt, not with messages")
    last = prompt[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        raise FinloraError(
            f"{where}: '{key}' must end with the user's turn (the answers follow it)"
        )
    return parse_record(where, {"messages": [*prompt, {"role": "assistant", "content": answer}]})


def _as_preference(base: InstructRecord, **extra: Any) -> PreferenceRecord:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(InstructRecord)}
    return PreferenceRecord(**fields, **extra)


def parse_preference(where: str, record: Any) -> PreferenceRecord:
    """Validate one decoded record (a pair or an unpaired one); raises FinloraError naming
    `where`."""
    if not isinstance(record, dict):
        raise FinloraError(f"{where}: expected an object, got {type(record).__name__}")
    pair, unpaired = "chosen" in record or "rejected" in record, "completion" in record
    if pair == unpaired:
        raise FinloraError(
            f"{where}: "
            + ("both " if pair else "neither ")
            + "a pair (prompt, chosen, rejected) "
            + ("and " if pair else "nor ")
            + "an unpaired record (prompt, completion, label)"
        )
    if pair:
        chosen, rejected = _answer(where, record, "chosen"), _answer(where, record, "rejected")
        if chosen.strip() == rejected.strip():
            raise FinloraError(f"{where}: 'chosen' and 'rejected' are the same answer")
        return _as_preference(_prompt(where, record, chosen), rejected=rejected)
    label = record.get("label")
    if not isinstance(label, bool):
        raise FinloraError(
            f"{where}: 'label' must be true (a desirable completion) or false (got {label!r})"
        )
    completion = _answer(where, record, "completion")
    return _as_preference(_prompt(where, record, completion), desirable=label)


def load_preference(path: Path) -> list[PreferenceRecord]:
    """Records from a .json list or a .jsonl file; raises FinloraError on the first bad one."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FinloraError(f"{path}: is a directory; give a preference .json or .jsonl file")
    text = read_text(path)
    rows = json_array(path, text) if text.lstrip().startswith("[") else json_lines(path, text)
    records = [parse_preference(f"{path}:{line}", record) for line, record in rows]
    if not records:
        raise FinloraError(f"{path}: no preference records")
    return records


def check_objective(records: list[PreferenceRecord], objective: str) -> None:
    """Refuse an unpaired record where the objective learns from pairs, naming the first."""
    if objective not in PAIRED_OBJECTIVES:
        return
    unpaired = next((r for r in records if not r.paired), None)
    if unpaired is not None:
        raise FinloraError(
            f"{unpaired.source}: an unpaired record (prompt, completion, label), and objective "
            f"{objective} learns from pairs (prompt, chosen, rejected); use "
            "preference.objective=kto"
        )


def _row(record: PreferenceRecord) -> dict[str, Any]:
    if record.instruction is not None:
        row: dict[str, Any] = {"prompt": record.instruction}
        if record.input:
            row["input"] = record.input
    else:
        row = {"messages": [{"role": m.role, "content": m.content} for m in record.prompt_messages]}
    if record.rejected is not None:
        return {**row, "chosen": record.response, "rejected": record.rejected}
    return {**row, "completion": record.response, "label": bool(record.desirable)}


def preference_lines(records: list[PreferenceRecord]) -> str:
    """Records as JSON Lines, in the shapes `load_preference` reads."""
    return "".join(json.dumps(_row(r), ensure_ascii=False) + "\n" for r in records)


def write_preference(records: list[PreferenceRecord], path: Path) -> None:
    atomic.write_text(path, preference_lines(records))


def unpaired(records: list[PreferenceRecord]) -> list[PreferenceRecord]:
    """The KTO form: each pair as its chosen answer (desirable) and its rejected one (not)."""
    out: list[PreferenceRecord] = []
    for r in records:
        if r.rejected is None:
            out.append(r)
            continue
        out.append(dataclasses.replace(r, rejected=None, desirable=True))
        rejected = (*r.prompt_messages, dataclasses.replace(r.messages[-1], content=r.rejected))
        out.append(dataclasses.replace(r, messages=rejected, rejected=None, desirable=False))
    return out


def preference_sha256(records: list[PreferenceRecord]) -> str:
    """A digest of records' content, to notice a packaged set that changed between versions."""
    return hashlib.sha256(preference_lines(records).encode("utf-8")).hexdigest()
