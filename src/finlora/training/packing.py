"""Sequence packing (`train.packing`): several instruction records share one training sequence.

Short records padded to the longest of their batch spend compute on padding; packed, the same
tokens fill fewer, fuller rows. Records are packed whole, best fit longest first (as TRL's
`pack_dataset` "bfd" strategy does), into sequences of at most data.max_length tokens; a record
the codec already cut to data.max_length fills a sequence alone, as it would unpacked. Each
packed record keeps its own positions (0, 1, ... restarting at each record), and transformers
builds from them a causal mask that lets no record attend to another, so a packed record's
logits and loss are its unpacked ones. The loss stays on the answer tokens only. On the fused
decoder path (LoRA on a CPU) attention runs one record per row instead, where that computes
fewer scores than the mask would (`models/fast/segments.py`).

TRL is not a dependency, and its packer works on `datasets` tables; the packing itself is the
few lines below.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from finlora.errors import FinloraError
from finlora.tasks.instruct import InstructCodec, InstructFeature


def check_packing(codec: Any) -> None:
    """Raise FinloraError where train.packing cannot apply to the loaded model: a seq2seq
    model. The task and the method are checked with the config (`config.tasks`)."""
    if not (isinstance(codec, InstructCodec) and codec.kind == "causal"):
        raise FinloraError(
            "train.packing needs a causal language model (a seq2seq model reads each prompt "
            "alone with its encoder)"
        )


def pack(features: Sequence[InstructFeature], max_length: int) -> list[InstructFeature]:
    """`features` packed into sequences of at most `max_length` tokens, best fit decreasing:
    each record, longest first, goes into the fullest sequence that still has room for it."""
    order = sorted(range(len(features)), key=lambda i: (-len(features[i].ids), i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin), sorted, for bins with any left
    for i in order:
        length = len(features[i].ids)
        found = bisect.bisect_left(room, (length, -1))
        if found < len(room):
            left, b = room.pop(found)
        else:
            left, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - length > 0:
            bisect.insort(room, (left - length, b))
    return [joined([features[i] for i in members]) for members in bins]


def joined(records: Sequence[InstructFeature]) -> InstructFeature:
    """One sequence of `records` in order, their targets and starts moved along with them."""
    ids: list[int] = []
    targets: list[int] = []
    starts: list[int] = []
    for record in records:
        offset = len(ids)
        starts += [offset + s for s in record.starts]
        targets += [offset + t for t in record.targets]
        ids += record.ids
    return InstructFeature(ids, tuple(targets), tuple(starts))
