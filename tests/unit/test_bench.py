"""The speed benchmarks run end to end on the tiny model and report what they promise.

Functional checks only: speed targets live in docs/benchmarks.md, never in timed tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finlora.bench import PeakMemory, bench_infer, bench_train, matmul_params, matmul_rate
from finlora.errors import FinloraError


def test_bench_train_reports_both_paths(tiny_overrides: list[str]) -> None:
    result = bench_train(None, tiny_overrides, n=12, rounds=1)
    for name in ("classic", "finlora"):
        entry = result[name]
        assert entry["real_tokens_per_s"] > 0
        assert 0 < entry["mfu"] < 1
        assert entry["peak_rss_mib"] > 0
    # Both paths see the same sentences, so the same real (non-pad) tokens.
    assert result["classic"]["real_tokens"] == result["finlora"]["real_tokens"]
    ratio = result["finlora"]["real_tokens_per_s"] / result["classic"]["real_tokens_per_s"]
    assert result["ratio"] == pytest.approx(ratio)
    json.dumps(result)


def test_bench_times_variants_beside_both_paths(tiny_overrides: list[str]) -> None:
    variant = "speed.fused_lora=false"
    result = bench_train(None, tiny_overrides, n=8, rounds=1, variants=[variant])
    entry = result["variants"][variant]
    assert entry["real_tokens"] == result["finlora"]["real_tokens"]
    assert entry["ratio"] == pytest.approx(
        entry["real_tokens_per_s"] / result["classic"]["real_tokens_per_s"]
    )
    assert set(result) >= {"classic", "finlora", "ratio"}
    assert variant not in result  # variants stay apart from the two paths the issue names
    infer = bench_infer(None, tiny_overrides, n=4, rounds=1, variants=[variant])
    assert infer["variants"][variant]["sentences_per_s"] > 0


def test_bench_without_classic_times_finlora_paths_against_each_other(
    tiny_overrides: list[str],
) -> None:
    variant = "speed.fused_lora=false"
    result = bench_train(None, tiny_overrides, n=8, rounds=1, variants=[variant], classic=False)
    assert "classic" not in result and "ratio" not in result
    entry = result["variants"][variant]
    assert "ratio" not in entry  # no classic path to compare with
    assert entry["ratio_to_finlora"] == pytest.approx(
        entry["real_tokens_per_s"] / result["finlora"]["real_tokens_per_s"]
    )
    infer = bench_infer(None, tiny_overrides, n=4, rounds=1, classic=False)
    assert set(infer) >= {"finlora"} and "classic" not in infer


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("speed.threads=1", "threads are process-wide"),
        ("data.path=other.csv", "same data and model"),  # the sentences are shared
        ("model.name=x", "same data and model"),
        ("speed.fused_lora", "--variant 'speed.fused_lora': expected KEY=VALUE"),
        ("train.batch_size=abc", "--variant 'train.batch_size=abc': config: train.batch_size"),
    ],
)
def test_bench_refuses_a_variant_it_cannot_time(
    tiny_overrides: list[str], variant: str, message: str
) -> None:
    with pytest.raises(FinloraError, match=re.escape(message)):
        bench_train(None, tiny_overrides, n=4, rounds=1, variants=[variant])


def test_bench_infer_reports_both_paths(tiny_overrides: list[str]) -> None:
    result = bench_infer(None, tiny_overrides, n=6, rounds=2)
    assert result["classic"]["sentences_per_s"] > 0
    assert result["finlora"]["sentences_per_s"] > 0
    assert result["n_sentences"] == 6
    rates = result["finlora"]["by_round"]  # each timed round's own rate, for the spread
    assert len(rates) == 2 and min(rates) <= result["finlora"]["sentences_per_s"] <= max(rates)


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_params_leaves_out_the_embedding_and_the_head(
    tiny_causal_dir: Path, tied: bool
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_causal_dir)
    config.tie_word_embeddings = tied  # untied, as `speed.bf16_head` leaves SmolLM2's head
    model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert (head is embedding) == tied
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    norm = model.model.norm.weight.numel()
    assert matmul_params(model) == layers + norm


def test_matmul_rate_and_peak_memory_are_measured() -> None:
    assert matmul_rate(None, seconds=0.05, size=64) > 0
    with PeakMemory().measure() as peak:
        block = bytearray(64 * 2**20)  # 64 MiB, touched
        block[::4096] = b"x" * len(block[::4096])
    assert peak.peak_mib >= 64


def _benchmark_json(script: str, overrides: list[str], *args: str) -> dict[str, Any]:
    """Run benchmarks/SCRIPT with each override as `--set` and `--json`: its last line, parsed."""
    path = Path(__file__).parents[2] / "benchmarks" / script
    sets = [arg for o in overrides for arg in ("--set", o)]
    done = subprocess.run(
        [sys.executable, str(path), *sets, *args, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_gemm_ceiling_runs_and_credits_the_flops_bench_credits(tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, "lora.r=4"]
    result = _benchmark_json(
        "gemm_ceiling.py", overrides, "--rows", "8,16", "--length", "4", "--reps", "1"
    )
    assert [s["rows"] for s in result["sizes"]] == [8, 16]
    for size in result["sizes"]:
        for key in ("distinct", "shared", "own"):
            assert size[key]["tokens_per_s"] > 0
            assert size[key]["mfu"] > 0
    assert result["matmul_flops_per_s"] > 0
    # The shapes come from a model built on the meta device: the same FLOPs a token as the
    # loaded model `bench train` times.
    bench = bench_train(None, overrides, n=4, rounds=1)
    assert result["flops_per_token"] == bench["flops_per_token"]


def test_compiled_layers_plain_function_matches_the_fused_layers(
    tiny_overrides: list[str],
) -> None:
    """The benchmark's plain layer computes what the fused layers do (fp32: the same loss and
    every LoRA gradient's norm), eager and compiled, so its timings compare like with like."""
    modes = ("--modes", "fused,eager,compiled")
    result = _benchmark_json(
        "compiled_layers.py", tiny_overrides, "--rows", "24", "--length", "6", "--reps", "1", *modes
    )
    assert result["rows"] == 24 and result["dtype"] == "torch.float32"
    fused = result["modes"]["fused"]
    # 2 layers x 7 projections, an A and a B each; B starts nonzero, so every one has a say.
    assert len(fused["grad_norms"]) == 28 and min(fused["grad_norms"]) > 0
    for mode in ("eager", "compiled"):
        entry = result["modes"][mode]
        assert entry["loss"] == pytest.approx(fused["loss"], rel=1e-5)
        assert entry["grad_norms"] == pytest.approx(fused["grad_norms"], rel=1e-4)
        assert entry["tokens_per_s"] > 0 and entry["mfu"] > 0
