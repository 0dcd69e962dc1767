"""Does a matrix multiply of a new shape cost more than one of a shape seen before?

    python benchmarks/mm_shapes.py [--dtype bf16] [--threads 2]

oneDNN builds (JIT-compiles) a kernel per shape for bf16 matmuls on CPUs with AVX512-BF16 or AMX
and caches it; batches of varying length bring new shapes. This times SmolLM2-135M's linear
shapes for rows M never seen against the same M again, which prices a new shape in rows.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (in, out) of SmolLM2's linears


def _time(rows: list[int], dtype: torch.dtype) -> float:
    """Seconds for one pass over SHAPES per entry of `rows`."""
    weights = [torch.randn(k, n, dtype=dtype) for k, n in SHAPES]
    inputs = {(m, k): torch.randn(m, k, dtype=dtype) for m in set(rows) for k, _ in SHAPES}
    start = time.perf_counter()
    for m in rows:
        for (k, _), w in zip(SHAPES, weights, strict=True):
            inputs[m, k] @ w
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    _time([512] * 5, dtype)  # warm-up: thread pool, allocator
    rows = [600 + 8 * i for i in range(args.calls)]
    new = _time(rows, dtype) / args.calls  # every M seen for the first time
    seen = _time(rows, dtype) / args.calls  # the same M again: kernels cached
    per_row = seen / (sum(rows) / len(rows))
    print(
        f"{args.dtype}: {len(SHAPES)} matmuls a call, M ~{sum(rows) // len(rows)} rows: "
        f"seen shapes {seen * 1e3:.2f} ms, new shapes {new * 1e3:.2f} ms; a new M costs "
        f"{(new - seen) * 1e3:.2f} ms = {(new - seen) / per_row:.0f} rows of work"
    )


if __name__ == "__main__":
    main()
