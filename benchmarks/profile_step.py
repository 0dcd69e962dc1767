"""Where finlora's training step and label scoring spend their time, operator by operator.

    .venv/bin/python benchmarks/profile_step.py configs/fpb-smollm2-lora.yaml -n 32 [--set ...]
        [--infer-only] [--shapes]

Runs finlora's path (as `finlora bench` sets it up) for one warm-up round, then one profiled
training round and one profiled scoring pass, and prints the operators by self CPU time. It
tells what to work on next; the speed figures themselves come from `finlora bench`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from finlora.bench import _finlora_infer_round, _finlora_train_round, setup
from finlora.methods import merged_for_inference
from finlora.models.fast.fused_projections import fuse_projections


def _table(prof: profile, rows: int, shapes: bool = False) -> str:
    averages = prof.key_averages(group_by_input_shape=shapes)
    return averages.table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("-n", type=int, default=32, help="sentences")
    parser.add_argument("--rows", type=int, default=25, help="operators to print")
    parser.add_argument("--infer-only", action="store_true", help="profile scoring alone")
    parser.add_argument("--shapes", action="store_true", help="one row per operator and shape")
    args = parser.parse_args()
    s = setup(args.config, args.overrides, args.n)
    path = s.paths["finlora"]
    print("autocast dtype", path.placement.dtype, "attention", path.placement.attention)
    if not args.infer_only:
        path.model.train()
        params = [p for p in path.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        _finlora_train_round(s, path, optimizer, 0)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            r = _finlora_train_round(s, path, optimizer, 1)
        print(f"\n=== training round: {r.units} real tokens in {r.seconds:.2f} s")
        print(_table(prof, args.rows, args.shapes))
    if path.cfg.speed.merge_for_inference:
        path.model = merged_for_inference(path.model)
    if path.cfg.speed.fuse_projections:
        fuse_projections(path.model)  # as prediction runs (and `bench infer`)
    path.model.eval()
    _finlora_infer_round(s, path, 0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        r = _finlora_infer_round(s, path, 1)
    print(f"\n=== scoring: {r.units} sentences in {r.seconds:.2f} s")
    print(_table(prof, args.rows, args.shapes))


if __name__ == "__main__":
    main()
