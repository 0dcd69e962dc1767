"""Training speed of finlora's path against one changed setting, round by round.

    .venv/bin/python benchmarks/ab_train.py configs/fpb-smollm2-lora.yaml \
        --variant speed.fused_lora=false -n 32 --rounds 8

For effects of a few percent on a machine whose speed drifts: the two paths alternate, their
order reversed every other round (as in `finlora bench`), and the median of the per-round
ratios is reported (a drift hits both paths of a round alike). No classic path:
`finlora bench train --variant` has that.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch

from finlora.bench import _alternate, _finlora_train_round, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?")
    parser.add_argument("--variant", required=True, metavar="KEY=VALUE")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("-n", type=int, default=32, help="sentences per round")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per path")
    args = parser.parse_args()
    s = setup(args.config, args.overrides, args.n, [args.variant])
    runs = {}
    for name, path in s.paths.items():
        path.model.train()
        params = [p for p in path.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        runs[name] = functools.partial(_finlora_train_round, s, path, optimizer)
    result = _alternate(runs, args.rounds)
    rates = {name: r["per_s_by_round"] for name, r in result.items()}
    for name, values in rates.items():
        print(f"{name:<28} tokens/s by round: {' '.join(f'{v:.0f}' for v in values)}")
    ratios = [a / b for a, b in zip(rates["finlora"], rates[args.variant], strict=True)]
    print(f"finlora / {args.variant} by round: {' '.join(f'{r:.3f}' for r in ratios)}")
    print(f"median ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
