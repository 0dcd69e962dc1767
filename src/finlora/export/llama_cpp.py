"""Scoring in llama.cpp (the optional `llama-cpp-python` package), to check a GGUF export:
label log-likelihoods for a classification run, next-token log-probabilities for an instruct run.

Text is tokenized by llama.cpp itself, as a llama.cpp user's would be, so the check covers the
GGUF tokenizer as well as the weights.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finlora.errors import FinloraError
from finlora.tasks.classify import LabelCodec

INSTALL_HINT = "pip install 'finlora[llama]' (llama-cpp-python)"
PORTABLE_HINT = (
    "reinstall it built for any x86-64 CPU: CMAKE_ARGS=-DGGML_NATIVE=OFF "
    "pip install --force-reinstall --no-cache-dir llama-cpp-python"
)
# Opens the file and evaluates two tokens, in a child process (see _check_runs_here).
_PROBE = (
    "import sys\n"
    "from llama_cpp import Llama\n"
    "llm = Llama(model_path=sys.argv[1], n_ctx=16, n_batch=16, verbose=False)\n"
    "llm.eval(llm.tokenize(b'ok', add_bos=False)[:2] or [0])\n"
)


@dataclass(frozen=True)
class Agreement:
    """How llama.cpp's scores of a GGUF match the adapter model's."""

    agreement: float  # labels (classify) or most likely next tokens (instruct) equal
    tokens_equal: float  # texts llama.cpp tokenizes exactly as finlora
    # Largest |label or answer-token log-likelihood difference|; None: no text tokenized alike.
    max_abs_loglik_diff: float | None
    accuracy: float | None = None  # llama.cpp's labels against the gold ones, where known


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _check_runs_here(gguf_path: Path) -> None:
    """Evaluate the file in a child process before this one loads it.

    A llama.cpp built for the CPU it was compiled on can use instructions that fail here: its
    AMX kernels died with SIGILL in a VM whose CPU reports AMX. In this process that signal
    would end the command with no word of why; in a child it becomes this error. A child that
    fails otherwise (a Python error) is left to the load in this process to report.
    """
    child = subprocess.run(
        [sys.executable, "-c", _PROBE, str(gguf_path)], capture_output=True, check=False
    )
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        raise FinloraError(
            f"llama.cpp died by {name} evaluating {gguf_path.name}: this build of it uses "
            f"instructions this machine refuses; {PORTABLE_HINT}"
        )


def _open(gguf_path: Path, n_ctx: int, threads: int | None) -> Any:
    from llama_cpp import Llama

    _check_runs_here(gguf_path)

    # Every position's logits are kept (logits_all): labels of several tokens, and answers, are
    # scored from the logits at each of their tokens.
    return Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=threads or min(4, os.cpu_count() or 1),
        verbose=False,
    )


def _tokenize(llm: Any, text: str) -> list[int]:
    # special=True: Hugging Face tokenizers also read special-token text as that token.
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def _log_softmax(logits: Any) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class LlamaCppScorer:
    """Label log-likelihoods from a GGUF file, the same way finlora scores a Hugging Face model."""

    def __init__(self, gguf_path: Path, codec: LabelCodec, threads: int | None = None) -> None:
        self.codec = codec
        self.llm = _open(gguf_path, codec.max_length + 8, threads)
        before, after = codec.template.parts(codec.labels)
        self._before = self._tokenize(before)
        self._after = self._tokenize(after)

    def _tokenize(self, text: str) -> list[int]:
        return _tokenize(self.llm, text)

    def encode_text(self, text: str) -> list[int]:
        """Prompt token ids as LabelCodec.encode_text builds them, tokenized by llama.cpp."""
        budget = self.codec.max_length - len(self._before) - len(self._after)
        budget -= self.codec.max_label_len
        return self._before + self._tokenize(text)[:budget] + self._after

    def _logp(self, position: int) -> np.ndarray:
        return _log_softmax(self.llm.scores[position])  # (V,)

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


class LlamaCppTokens:
    """Next-token log-probabilities from a GGUF file, for any token sequence."""

    def __init__(self, gguf_path: Path, n_ctx: int, threads: int | None = None) -> None:
        self.llm = _open(gguf_path, n_ctx, threads)

    def tokenize(self, text: str) -> list[int]:
        return _tokenize(self.llm, text)

    def logp(self, ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """Log-probabilities of the token after each of `positions` in `ids`. (P, V)"""
        self.llm.reset()
        self.llm.eval(list(ids))
        return _log_softmax(np.stack([self.llm.scores[p] for p in positions]))

    def close(self) -> None:
        close: Any = getattr(self.llm, "close", None)
        if close is not None:
            close()
