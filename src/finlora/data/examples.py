"""The one record every loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """A labelled piece of text.

    `label` is the canonical label name (e.g. "positive"), already mapped from whatever the
    source file used; `source` ("path:line" or "synthetic:i") points messages and reports back
    at where the example came from. `repaired`: the loader undid a wrong decode in the text
    (mojibake, C1 controls); what the example is does not change with it.
    """

    text: str
    label: str
    source: str = ""
    repaired: bool = field(default=False, compare=False)
