"""finlora: offline parameter-efficient fine-tuning of open language models for financial text."""

import os

__version__ = "0.1.0"

# oneDNN (torch's bf16 matmuls on CPUs with AVX512-BF16 or AMX) keeps a JIT-compiled kernel per
# matrix shape, 1,024 by default. Every micro-batch of a different length brings ~25 new shapes,
# so the cache rarely hits in training yet grew the process by ~0.3 GiB over a short run; 64
# measured the same speed. Read when oneDNN builds its first kernel, so this takes effect even
# after torch is imported; a value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
