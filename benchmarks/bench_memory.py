"""Peak resident memory and speed of training against `speed.max_batch_tokens`.

    .venv/bin/python benchmarks/bench_memory.py --budget null   # then auto, 1024 (one process each)

Loads the model once (as `finlora train` does), trains 2 passes over N FPB training sentences in
batches of 16 through the same `accumulate_batch` as the trainer, and prints the process's peak
RSS (VmHWM) and real tokens/s. One budget per process, since the peak is per process.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from finlora.config import load_config
from finlora.data.prepare import prepare_data
from finlora.methods import build_method
from finlora.models import Placement, load_base_model
from finlora.models.device import set_gradient_checkpointing
from finlora.prompts import PromptTemplate
from finlora.tasks.classify import LabelCodec, length_grouped_batches
from finlora.train import accumulate_batch

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "fpb-smollm2-lora.yaml"


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="auto", help="max_batch_tokens: a count, auto or null")
    parser.add_argument("-n", type=int, default=160, help="training sentences")
    parser.add_argument(
        "--checkpointing", action="store_true", help="speed.gradient_checkpointing=true"
    )
    parser.add_argument(
        "--every", type=int, default=1, help="speed.gradient_checkpointing_every (checkpointing)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    if not os.environ.get("FINLORA_FPB_DIR"):
        raise SystemExit("set FINLORA_FPB_DIR to the Financial PhraseBank directory")
    cfg = load_config(
        RECIPE,
        [
            f"speed.max_batch_tokens={args.budget}",
            f"speed.gradient_checkpointing={str(args.checkpointing).lower()}",
            f"speed.gradient_checkpointing_every={args.every}",
            *args.overrides,
        ],
    )
    placement = Placement.from_config(cfg.train, cfg.speed)
    data = prepare_data(cfg.data, cfg.seed)
    base = load_base_model(cfg.model.name, False, placement.attention)
    codec = LabelCodec(
        base.tokenizer, PromptTemplate.load(cfg.data.template), data.labels, base.kind, 128
    )
    model = placement.place(build_method(base.model, cfg, base.kind)).train()
    set_gradient_checkpointing(
        model, cfg.speed.gradient_checkpointing, cfg.speed.gradient_checkpointing_every
    )
    features = [codec.encode(e) for e in data.rows("train")[: args.n]]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    start, tokens = time.perf_counter(), 0
    for epoch in range(2):
        lengths = [len(f.prompt_ids) for f in features]
        for idx in length_grouped_batches(lengths, cfg.train.batch_size, epoch):
            _, real = accumulate_batch(model, codec, [features[i] for i in idx], cfg, placement)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += real
    rate = tokens / (time.perf_counter() - start)
    print(
        f"max_batch_tokens={args.budget}, gradient_checkpointing={args.checkpointing}"
        f" (every {args.every}){''.join(' ' + o for o in args.overrides)}: "
        f"peak RSS {peak_rss_gib():.2f} GiB, {rate:.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
