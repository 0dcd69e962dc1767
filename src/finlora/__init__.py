"""finlora: offline parameter-efficient fine-tuning of open language models for financial text."""

import os

__version__ = "0.1.0"

# oneDNN (torch's bf16 matmuls on CPUs with AVX512-BF16 or AMX) keeps a JIT-compiled kernel per
# matrix shape, 1,024 by default. Every micro-batch of a different length brings ~25 new shapes,
# which grew a short training run by ~0.3 GiB; 64 trained two epochs at the same speed (see
# docs/benchmarks.md, stop 16). Read when oneDNN builds its first kernel, so this takes effect
# even after torch is imported; a value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
