"""Prompt templates: small JSON data files loaded by one small class (as alpaca-lora's Prompter)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from finlora.data.textfile import json_beyond_limits
from finlora.errors import FinloraError

CHAT_TEMPLATE = "chat"  # the model's own chat template (instruct runs)


def template_text(name_or_path: str) -> str | None:
    """A template file's text: a shipped one by name, or a file by path; None for the model's
    own chat template, which has no file."""
    if name_or_path == CHAT_TEMPLATE:
        return None
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FinloraError(f"{path}: no such template file")
        try:
            # -sig: editors on Windows start UTF-8 files with a byte order mark
            return path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise FinloraError(f"{path}: not UTF-8 text (a template is a JSON file)") from None
    shipped = resources.files("finlora") / "templates" / f"{name_or_path}.json"
    if not shipped.is_file():
        raise FinloraError(f"data.template: no shipped template named {name_or_path!r}")
    return shipped.read_text(encoding="utf-8")


def _read_template(name_or_path: str) -> dict[str, Any]:
    """A template's JSON object: a shipped one by name, or a file by path."""
    text = template_text(name_or_path)
    if text is None:
        raise FinloraError("data.template: chat is the model's own template, not a file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FinloraError(f"{name_or_path}: malformed JSON template ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise FinloraError(f"{name_or_path}: {json_beyond_limits(exc)}") from None
    if not isinstance(data, dict):
        raise FinloraError(f"{name_or_path}: a template must be a JSON object")
    return data


def _string(name_or_path: str, data: dict[str, Any], key: str, default: str = "") -> str:
    """`data[key]` (`default` when absent), which must be a string: prompts are built from it."""
    value = data.get(key, default)
    if not isinstance(value, str):
        raise FinloraError(
            f"{name_or_path}: '{key}' must be a string (got a {type(value).__name__})"
        )
    return value


@dataclass(frozen=True)
class PromptTemplate:
    """`prompt` holds `{text}` (and optionally `{labels}`); a label is verbalised as prefix+name."""

    name: str
    prompt: str
    label_prefix: str = " "
    description: str = ""

    @classmethod
    def load(cls, name_or_path: str) -> PromptTemplate:
        """Load a shipped template by name, or a JSON file by path."""
        data = _read_template(name_or_path)
        prompt = _string(name_or_path, data, "prompt")
        if "{text}" not in prompt:
            raise FinloraError(f"{name_or_path}: a template needs a 'prompt' containing {{text}}")
        return cls(
            name=Path(name_or_path).stem,
            prompt=prompt,
            label_prefix=_string(name_or_path, data, "label_prefix", " "),
            description=_string(name_or_path, data, "description"),
        )

    def parts(self, labels: list[str]) -> tuple[str, str]:
        """The prompt text before and after `{text}`, with `{labels}` filled in."""
        before, after = self.prompt.split("{text}", 1)
        joined = ", ".join(labels)
        return before.replace("{labels}", joined), after.replace("{labels}", joined)

    def verbalize(self, label: str) -> str:
        return f"{self.label_prefix}{label}"


_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


@dataclass(frozen=True)
class InstructTemplate:
    """An instruction prompt: "chat" (the model's own chat template) or Alpaca-style text.

    Alpaca-style templates hold `{instruction}` in both prompts and `{input}` in `prompt_input`,
    the one used when a record has an input.
    """

    name: str
    prompt_input: str = ""
    prompt_no_input: str = ""
    description: str = ""

    @property
    def is_chat(self) -> bool:
        return self.name == CHAT_TEMPLATE

    @classmethod
    def load(cls, name_or_path: str) -> InstructTemplate:
        if name_or_path == CHAT_TEMPLATE:
            return cls(CHAT_TEMPLATE, description="the model's own chat template")
        data = _read_template(name_or_path)
        with_input = _string(name_or_path, data, "prompt_input")
        without = _string(name_or_path, data, "prompt_no_input")
        if "{instruction}" not in with_input + without or "{input}" not in with_input:
            raise FinloraError(
                f"{name_or_path}: an instruction template needs 'prompt_input' (with "
                "{instruction} and {input}) and 'prompt_no_input' (with {instruction}); for "
                "classification use task: classify"
            )
        description = _string(name_or_path, data, "description")
        return cls(Path(name_or_path).stem, with_input, without, description)

    def prompt(self, instruction: str, input_text: str = "") -> str:
        template = self.prompt_input if input_text else self.prompt_no_input
        values = {"instruction": instruction, "input": input_text}
        # One pass, not str.format: user text may hold braces or the placeholders themselves.
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
