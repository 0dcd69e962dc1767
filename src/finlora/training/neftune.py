"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"):
uniform noise on the input embeddings while training (`train.neftune_alpha`).

transformers' Trainer adds it with a forward hook on the input embeddings
(`transformers.integrations.neftune`): noise drawn uniformly from ±alpha/sqrt(L·d), L the
row's width (padding, or packing, included) and d the embedding width. finlora runs its own
loop, so it attaches the same hook for the length of that loop. The hook adds noise only while
the embedding module is in training mode, so validation (which sets eval mode) reads clean
embeddings; a hook and a plain attribute, nothing of it reaches the state dict, a checkpoint or
the saved adapter, and both are gone when the loop ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from transformers.integrations.neftune import neftune_post_forward_hook

from finlora.scoring import unwrap


@contextlib.contextmanager
def noisy_embeddings(model: Any, alpha: float | None) -> Iterator[None]:
    """Within the block, `model`'s input embeddings get NEFTune noise of `alpha` in training
    mode; None: no noise."""
    if alpha is None:
        yield
        return
    embeddings = unwrap(model).get_input_embeddings()
    embeddings.neftune_noise_alpha = alpha  # where transformers' hook reads it
    handle = embeddings.register_forward_hook(neftune_post_forward_hook)
    try:
        yield
    finally:
        handle.remove()
        del embeddings.neftune_noise_alpha
