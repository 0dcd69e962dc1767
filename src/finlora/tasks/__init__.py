"""Task types: how examples become model inputs and targets.

A registry maps each task name to the codec that encodes its rows (`codec_for`); training and
every command that loads a run build their codec through it, so a new task is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from finlora.config import DataConfig
from finlora.errors import FinloraError
from finlora.tasks.classify import Batch, LabelCodec, Overflow
from finlora.tasks.instruct import InstructCodec
from finlora.tasks.preference import PreferenceCodec


class Codec(Protocol):
    """What training needs of a task's codec: rows in, features and padded batches out."""

    kind: str  # causal, seq2seq or encoder
    max_length: int
    overflow: Overflow

    @property
    def prompt_only(self) -> bool: ...

    def encode(self, row: Any) -> Any: ...  # a feature, or None where nothing is left to train

    def width(self, feature: Any) -> int: ...

    def target_count(self, feature: Any) -> int: ...

    def training_batch(self, features: Sequence[Any]) -> Batch: ...


# tokenizer, data section, the run's labels, model kind -> codec
_Factory = Callable[[Any, DataConfig, Sequence[str], str], Codec]


def _instruct(tokenizer: Any, data: DataConfig, _labels: Sequence[str], kind: str) -> Codec:
    return InstructCodec.for_data(tokenizer, data, kind)  # its labels come from its records


def _preference(tokenizer: Any, data: DataConfig, _labels: Sequence[str], kind: str) -> Codec:
    return PreferenceCodec.for_data(tokenizer, data, kind)


CODECS: dict[str, _Factory] = {
    "classify": LabelCodec.for_data,
    "instruct": _instruct,
    "preference": _preference,
}


def codec_for(
    task: str, tokenizer: Any, data: DataConfig, labels: Sequence[str], kind: str
) -> Codec:
    """The codec of `task` for this tokenizer, data section, label set and model kind."""
    try:
        factory = CODECS[task]
    except KeyError:
        raise FinloraError(f"task {task!r}: not one of {', '.join(CODECS)}") from None
    return factory(tokenizer, data, labels, kind)
