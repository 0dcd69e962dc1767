"""The one record every loader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A labelled piece of text.

    `label` is the canonical label name (e.g. "positive"), already mapped from whatever the
    source file used; `source` ("path:line" or "synthetic:i") points messages and reports back
    at where the example came from.
    """

    text: str
    label: str
    source: str = ""
