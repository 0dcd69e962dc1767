"""Prompt templates: small JSON data files loaded by one small class (as alpaca-lora's Prompter)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from finlora.errors import FinloraError


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
        path = Path(name_or_path)
        if path.suffix == ".json" or path.exists():
            if not path.is_file():
                raise FinloraError(f"{path}: no such template file")
            text = path.read_text(encoding="utf-8")
        else:
            shipped = resources.files("finlora") / "templates" / f"{name_or_path}.json"
            if not shipped.is_file():
                raise FinloraError(f"data.template: no shipped template named {name_or_path!r}")
            text = shipped.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FinloraError(f"{name_or_path}: malformed JSON template ({exc.msg})") from None
        if not isinstance(data, dict) or "{text}" not in str(data.get("prompt", "")):
            raise FinloraError(f"{name_or_path}: a template needs a 'prompt' containing {{text}}")
        return cls(
            name=path.stem,
            prompt=data["prompt"],
            label_prefix=data.get("label_prefix", " "),
            description=data.get("description", ""),
        )

    def parts(self, labels: list[str]) -> tuple[str, str]:
        """The prompt text before and after `{text}`, with `{labels}` filled in."""
        before, after = self.prompt.split("{text}", 1)
        joined = ", ".join(labels)
        return before.replace("{labels}", joined), after.replace("{labels}", joined)

    def verbalize(self, label: str) -> str:
        return f"{self.label_prefix}{label}"
