"""Label scoring in llama.cpp (the optional `llama-cpp-python` package), to check a GGUF export.

A prompt is tokenized by llama.cpp itself, as a llama.cpp user's would be, so the check covers
the GGUF tokenizer as well as the weights.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finlora.tasks.classify import LabelCodec

INSTALL_HINT = "pip install 'finlora[llama]' (llama-cpp-python)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppScorer:
    """Label log-likelihoods from a GGUF file, the same way finlora scores a Hugging Face model."""

    def __init__(self, gguf_path: Path, codec: LabelCodec, threads: int | None = None) -> None:
        from llama_cpp import Llama

        self.codec = codec
        # Every position's logits are kept (logits_all) because multi-token labels are scored
        # from the logits at each label token.
        self.llm = Llama(
            model_path=str(gguf_path),
            n_ctx=codec.max_length + 8,
            n_batch=codec.max_length + 8,
            logits_all=True,
            n_threads=threads or min(4, os.cpu_count() or 1),
            verbose=False,
        )
        before, after = codec.template.parts(codec.labels)
        self._before = self._tokenize(before)
        self._after = self._tokenize(after)

    def _tokenize(self, text: str) -> list[int]:
        # special=True: Hugging Face tokenizers also read special-token text as that token.
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def encode_text(self, text: str) -> list[int]:
        """Prompt token ids as LabelCodec.encode_text builds them, tokenized by llama.cpp."""
        budget = self.codec.max_length - len(self._before) - len(self._after)
        budget -= self.codec.max_label_len
        return self._before + self._tokenize(text)[:budget] + self._after

    def _logp(self, position: int) -> np.ndarray:
        logits = np.asarray(self.llm.scores[position], dtype=np.float64)  # (V,)
        shifted = logits - logits.max()
        return shifted - np.log(np.exp(shifted).sum())

    def label_loglik(self, prompt: Sequence[int]) -> np.ndarray:
        """Log-likelihood of every label's tokens after `prompt`. (K,)"""
        self.llm.reset()
        self.llm.eval(list(prompt))
        last = len(prompt) - 1
        if self.codec.single_token_labels:
            logp = self._logp(last)
            return np.array([logp[ids[0]] for ids in self.codec.label_ids])
        scores = []
        for ids in self.codec.label_ids:
            # Rewind to the end of the prompt; eval drops the cache past n_tokens.
            self.llm.n_tokens = len(prompt)
            self.llm.eval(ids[:-1])
            scores.append(sum(self._logp(last + j)[token] for j, token in enumerate(ids)))
        return np.array(scores)

    def close(self) -> None:
        close: Any = getattr(self.llm, "close", None)
        if close is not None:
            close()
