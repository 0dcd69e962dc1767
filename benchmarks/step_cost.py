"""What one training pass costs as its micro-batch grows: a fixed part and a part per token.

    .venv/bin/python benchmarks/step_cost.py configs/fpb-smollm2-lora.yaml [-n 64]
        [--sizes 1,2,4,8,12,16] [--reps 7] [--set ...] [--json]

Runs finlora's path (as `finlora bench train` sets it up) forward and backward on micro-batches
of 1, 2, 4, ... sentences of about the same length, takes the median time of each size, and
fits time = fixed + tokens / marginal rate by least squares. The fixed part is what a pass
costs whatever its size (weights read by every matmul, operator and Python overhead); the
marginal rate is what a bigger micro-batch approaches, so the model-FLOPs utilisation at that
rate bounds what larger batches could reach. Not a speed figure of its own: `finlora bench`
gives those.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from finlora.bench import _example, matmul_params, matmul_rate, setup
from finlora.train import accumulate_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("-n", type=int, default=64, help="sentences to draw the batches from")
    parser.add_argument("--sizes", default="1,2,4,8,12,16", help="sentences per micro-batch")
    parser.add_argument("--reps", type=int, default=7, help="timed passes per size")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    sizes = sorted({int(k) for k in args.sizes.split(",")})
    s = setup(args.config, [*args.overrides, "speed.max_batch_tokens=null"], args.n)
    path = s.paths["finlora"]
    path.model.train()
    features = [
        path.codec.encode(_example(t, path.codec.labels[y]))
        for t, y in zip(s.texts, s.labels, strict=True)
    ]
    if max(sizes) > len(features):
        parser.error(f"--sizes asks for {max(sizes)} sentences of -n {len(features)}")
    # The sentences nearest the median length: every size pads to about the same width.
    features.sort(key=lambda f: len(f.prompt_ids))
    middle = len(features) // 2
    pool = features[max(0, middle - max(sizes) // 2) :][: max(sizes)]
    # Sizes take turns within each repetition, so a drift of the machine's speed hits all alike.
    times: dict[int, list[float]] = {k: [] for k in sizes}
    tokens: dict[int, int] = {}
    for _ in range(args.reps + 1):  # the first repetition builds each size's kernels
        for k in sizes:
            start = time.perf_counter()
            _, tokens[k] = accumulate_batch(path.model, path.codec, pool[:k], path.cfg,
                                            path.placement)  # fmt: skip
            times[k].append(time.perf_counter() - start)
            path.model.zero_grad(set_to_none=True)
    rows = [
        {"sentences": k, "real_tokens": tokens[k], "seconds": statistics.median(times[k][1:])}
        for k in sizes
    ]
    fit = statistics.linear_regression(
        [r["real_tokens"] for r in rows], [r["seconds"] for r in rows]
    )
    slope, fixed = fit.slope, fit.intercept
    rate = matmul_rate(path.placement.dtype)
    flops_per_token = 4 * matmul_params(path.model)
    for r in rows:
        r["tokens_per_s"] = r["real_tokens"] / r["seconds"]
        r["mfu"] = r["tokens_per_s"] * flops_per_token / rate
    result = {
        "fixed_seconds": fixed,
        "marginal_tokens_per_s": 1 / slope,
        "marginal_mfu": flops_per_token / slope / rate,
        "matmul_flops_per_s": rate,
        "flops_per_token": flops_per_token,
        "sizes": rows,
    }
    print(f"{'sentences':>9} {'tokens':>7} {'ms':>8} {'tokens/s':>9} {'MFU':>6}")
    for r in rows:
        print(f"{r['sentences']:>9} {r['real_tokens']:>7} {r['seconds'] * 1e3:>8.0f} "
              f"{r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%}")  # fmt: skip
    print(f"fixed cost per pass {fixed * 1e3:.0f} ms; marginal rate {1 / slope:.0f} tokens/s "
          f"= MFU {result['marginal_mfu']:.1%} of {rate / 1e9:.0f} GFLOP/s")  # fmt: skip
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
