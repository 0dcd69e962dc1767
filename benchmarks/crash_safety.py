"""Crash safety of training: runs SIGKILLed at random points resume to the same adapter.

    .venv/bin/python benchmarks/crash_safety.py --kills 10 --seed 0

Trains a tiny Llama (2 layers, hidden 32, built here from a config: no download) on a small
Financial PhraseBank-format file through the real CLI: first an uninterrupted reference run,
counting how often it passes each kill point (`finlora.atomic.kill_point`); then `--kills` runs,
each SIGKILLed by $FINLORA_KILL_AT=POINT:N at the Nth pass of a point drawn with N at random,
then `finlora train --resume` until it finishes (or, for a run killed before its first
checkpoint, the same command with --overwrite, as the refusal says). Each finished run must
match the reference byte for byte: the adapter, the last checkpoint's weights and the
metrics (but their tokens/s). Prints a JSON summary; exits 1 if any run differs.

The kill points: `step` (mid optimizer step), `validation` (an epoch's validation under way),
`checkpoint` (a checkpoint half written), `rename` (a directory whole, not yet renamed into
place: the tokenizer, a checkpoint or the adapter), `swap` (the best adapter being replaced:
old moved aside, new not yet in place), `prune` (a new checkpoint in place, the old not yet
removed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

POINTS = ("step", "validation", "checkpoint", "rename", "swap", "prune")
# 60 sentences: 36 train (5 batches of 8, so 5 steps an epoch), 12 validation, 12 test.
# 12 steps over 3 epochs: validations at steps 5, 10 and 12, checkpoints at 2, 4, 5, 6, 8, 10, 12.
OVERRIDES = [
    "speed.threads=1",
    "train.epochs=3",
    "train.max_steps=12",
    "train.checkpoint_every=2",
    "train.learning_rate=0.01",
    "train.precision=fp32",
    "train.device=cpu",
    "train.batch_size=8",
    "speed.eval_batch_size=16",
    "train.log_every=1",
    "lora.r=4",
    "lora.lora_alpha=8",
    "data.test_fraction=0.2",
    "data.val_fraction=0.2",
]
# Runs the CLI with every kill point counted (the reference run).
COUNTING = """
import atexit, collections, json, os
import finlora.atomic as atomic
from finlora.cli import main
counts = collections.Counter()
passed = atomic.kill_point
def counting(name):
    counts[name] += 1
    passed(name)
atomic.kill_point = counting
atexit.register(lambda: open(os.environ["COUNTS_TO"], "w").write(json.dumps(counts)))
main()
"""


def build_tiny(work: Path) -> tuple[Path, Path]:
    """A 2-layer Llama with a BPE tokenizer trained on the synthetic sentences (as
    tests/conftest.py builds it), and 60 FPB-format lines, 20 of each label."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from finlora.data import FPB_LABELS, synthetic_sentiment

    prompt = "Financial news: Sentiment (negative, neutral, positive): negative neutral positive"
    corpus = [e.text for e in synthetic_sentiment(200)] + [prompt] * 30
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = work / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    taken = dict.fromkeys(FPB_LABELS, 0)
    lines = []
    for example in synthetic_sentiment(400):
        if taken[example.label] < 20:
            taken[example.label] += 1
            lines.append(f"{example.text}@{example.label}\n")
    data = work / "Sentences_tiny.txt"
    data.write_text("".join(lines), encoding="utf-8")
    return model_dir, data


def finlora(args: list[str], env: dict[str, str], script: str | None = None) -> Any:
    command = [sys.executable, *(["-c", script] if script else ["-m", "finlora.cli"]), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def fingerprint(run: Path) -> dict[str, Any]:
    """What must come out the same: the adapter's and the last checkpoint's bytes, the
    metrics but their throughput, and no temporary entry left behind."""
    (checkpoint,) = sorted((run / "checkpoints").glob("step-*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "adapter": (run / "adapter" / "adapter_model.safetensors").read_bytes(),
        "checkpoint": (checkpoint.name, (checkpoint / "trainable.safetensors").read_bytes()),
        "metrics": [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows],
        "leftovers": sorted(p.name for d in (run, run / "checkpoints") for p in d.glob(".*")),
    }


def crash_and_resume(
    train: list[str], run: Path, point: str, nth: int, env: dict[str, str]
) -> dict[str, Any]:
    """Kill a run at the `nth` pass of `point`, then resume it (or start it again with
    --overwrite where it has no checkpoint) until it finishes."""
    killed = finlora(train, {**env, "FINLORA_KILL_AT": f"{point}:{nth}"})
    record: dict[str, Any] = {"point": point, "nth": nth, "killed": killed.returncode == -9}
    if killed.returncode != -9:
        record["error"] = f"not killed (exit {killed.returncode}): {killed.stderr[-300:]}"
        return record
    record["checkpoint_left"] = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    record["commands_after"] = []
    for _ in range(3):
        resumed = finlora(["train", "--resume", "--output", str(run), "--no-progress"], env)
        if resumed.returncode == 0:
            record["commands_after"].append("--resume")
            return record
        message = resumed.stderr.strip().splitlines()[-1] if resumed.stderr.strip() else ""
        if "--overwrite" not in message:
            record["error"] = f"--resume failed (exit {resumed.returncode}): {message}"
            return record
        record["commands_after"].append("--resume refused: " + message)
        again = finlora([*train, "--overwrite"], env)
        if again.returncode == 0:
            record["commands_after"].append("--overwrite")
            return record
    record["error"] = "did not finish"
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="killed runs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill points")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="finlora-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_dir, data = build_tiny(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINLORA_HOME": str(work / "home")}
    env.pop("FINLORA_KILL_AT", None)
    overrides = [f"model.name={model_dir}", f"data.path={data}", *OVERRIDES]
    sets = [arg for item in overrides for arg in ("--set", item)]

    def train_args(run: Path) -> list[str]:
        return ["train", "--output", str(run), "--no-progress", *sets]

    reference = work / "reference"
    counted = finlora(
        train_args(reference), {**env, "COUNTS_TO": str(work / "counts.json")}, COUNTING
    )
    if counted.returncode:
        sys.exit(f"reference run failed: {counted.stderr}")
    counts = json.loads((work / "counts.json").read_text())
    expected = fingerprint(reference)
    # Every kind of point in turn, so that each is hit; N at random among its passes.
    rng = random.Random(args.seed)
    reachable = [p for p in POINTS if counts.get(p)]
    runs = []
    for i in range(args.kills):
        point = reachable[i % len(reachable)]
        nth = rng.randint(1, counts[point])
        run = work / f"killed-{i:02d}-{point}-{nth}"
        record = crash_and_resume(train_args(run), run, point, nth, env)
        if "error" not in record:
            got = fingerprint(run)
            record["identical"] = {k: got[k] == expected[k] for k in expected}
        runs.append(record)
        print(json.dumps(record), file=sys.stderr)
    survived = sum(1 for r in runs if "identical" in r and all(r["identical"].values()))
    summary = {
        "kill_points_in_reference_run": counts,
        "kills": len(runs),
        "killed": sum(1 for r in runs if r["killed"]),
        "survived": survived,
        "by_point": {p: sum(1 for r in runs if r["point"] == p) for p in reachable},
        "runs": runs,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "workdir": str(work),
    }
    print(json.dumps(summary, indent=2))
    sys.exit(0 if survived == len(runs) else 1)


if __name__ == "__main__":
    main()
