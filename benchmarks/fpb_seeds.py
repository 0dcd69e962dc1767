"""Accuracy benchmark: the default FPB recipe over several seeds, plus the zero-shot base model.

    .venv/bin/python benchmarks/fpb_seeds.py --seeds 42,43,44 --out runs/bench-fpb

Trains `configs/fpb-smollm2-lora.yaml` once per seed (each seed also draws its own split),
evaluates each run on its held-out test rows and the base model zero-shot on the same rows, and
prints a Markdown table (also written to OUT/results.md and OUT/results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from finlora.config import load_config
from finlora.evaluate import evaluate_run
from finlora.train import train

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "fpb-smollm2-lora.yaml"


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-fpb"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if not os.environ.get("FINLORA_FPB_DIR"):
        raise SystemExit("set FINLORA_FPB_DIR to the Financial PhraseBank directory")

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = load_config(RECIPE, [f"seed={seed}", *args.overrides])
        run_dir = args.out / f"seed{seed}"
        started = time.perf_counter()
        result = train(cfg, run_dir, overwrite=True, progress_bar=False)
        wall = time.perf_counter() - started
        tuned = evaluate_run(run_dir, progress=False)
        zero = evaluate_run(run_dir, zero_shot=True, progress=False)
        rows.append(
            {
                "seed": seed,
                "n_test": tuned["n"],
                "accuracy": tuned["accuracy"],
                "macro_f1": tuned["macro_f1"],
                "weighted_f1": tuned["weighted_f1"],
                "ece": tuned["ece"],
                "zero_shot_accuracy": zero["accuracy"],
                "zero_shot_macro_f1": zero["macro_f1"],
                "train_s": result.train_seconds,
                "wall_s": wall,
                "tokens_per_s": result.real_tokens_per_s,
                "best_epoch": result.best_epoch,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in rows)

    lines = [
        f"Machine: {_machine()}",
        "",
        "| seed | n test | accuracy | macro-F1 | weighted-F1 | ECE | zero-shot acc "
        "| zero-shot macro-F1 | train time (s) | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['n_test']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['weighted_f1']:.4f} | {r['ece']:.4f} | {r['zero_shot_accuracy']:.4f} | "
            f"{r['zero_shot_macro_f1']:.4f} | {r['train_s']:.0f} | {r['tokens_per_s']:.0f} |"
        )
    lines.append(
        f"| **mean** | | **{mean('accuracy'):.4f}** | **{mean('macro_f1'):.4f}** | "
        f"{mean('weighted_f1'):.4f} | {mean('ece'):.4f} | {mean('zero_shot_accuracy'):.4f} | "
        f"{mean('zero_shot_macro_f1'):.4f} | {mean('train_s'):.0f} | {mean('tokens_per_s'):.0f} |"
    )
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table + "\n", encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
