"""The MFU a LoRA training pass could reach if everything but its matrix multiplies were free.

    .venv/bin/python benchmarks/gemm_ceiling.py [configs/fpb-smollm2-lora.yaml] [--set ...]
        [--rows 128,256,512,1024,2048] [--length 48] [--reps 5] [--json]

For each micro-batch of ROWS tokens (sentences of LENGTH tokens), this runs the matrix
multiplies of one training pass of finlora's fused decoder layers, and nothing else: per layer,
forward, the stacked GEMMs that give the frozen projections' outputs and every LoRA x·A at once,
the block-diagonal B products and the attention's two batched products; backward, the attention's
four products, the LoRA gradients and the input gradients through W and A. The shapes are those
of the fused layers' own stacks for the config's model and LoRA settings, built on the meta
device (no weights are read); the weights are random bf16. Everything between the matmuls
(norms, rotary embedding, softmax, silu·mul, residual adds, casts, autograd, Python) costs
nothing here, so the result is a ceiling, and an optimistic one:
- `distinct weights`: every layer has its own weights, as in a real pass (the weights of all
  layers do not fit in the caches, so each comes from L3 or memory);
- `one layer's weights`: all layers share one set, which then stays in cache. No real pass can do
  this; it is the matmuls at their best;
- `distinct weights, activations`: every layer also has its own inputs and gradients, as a real
  pass reads back what each layer saved (the first two cases share one set, in cache where it
  fits).

All rows count as real tokens (no padding). MFU is reckoned as `finlora bench train` does
(`matmul_params`: 4 x the parameters of every per-token matmul a token), against the
square-matrix rate `matmul_rate` measures in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from finlora.bench import matmul_params, matmul_rate
from finlora.config import load_config
from finlora.errors import FinloraError
from finlora.methods import build_method
from finlora.models.fast.fused_decoder import _fits, _LayerState
from finlora.models.loading import model_config

DTYPE = torch.bfloat16
STACKS = ("qkv", "o", "gate_up", "down")


def _rand(*size: int) -> torch.Tensor:
    return torch.randn(*size, dtype=DTYPE)


class Layout:
    """The fused layers' matmul shapes for a config's model and LoRA settings, and the FLOPs
    `bench` credits a token."""

    def __init__(self, config_path: Path | None, overrides: list[str]) -> None:
        cfg = load_config(config_path, overrides)
        config, _ = model_config(cfg.model.name)
        with torch.device("meta"):
            model = build_method(AutoModelForCausalLM.from_config(config), cfg, "causal")
        layers = [m for m in model.modules() if _fits(m)]
        if not layers:
            raise FinloraError(
                f"gemm_ceiling: no decoder layer of {cfg.model.name} takes the fused path"
            )
        state, attn = _LayerState(layers[0]), layers[0].self_attn
        # (stacked weight rows, input width, output width) as `_Stack` builds them.
        self.stacks = {
            name: (*stack.weight.shape, stack.out_total)
            for name, stack in zip(STACKS, state.stacks, strict=True)
        }
        self.layers, self.head_dim = len(layers), attn.head_dim
        self.kv_heads, self.group = config.num_key_value_heads, attn.num_key_value_groups
        self.flops_per_token = 4 * matmul_params(model)

    def weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One layer's (stacked weight (out + Σr, in), block-diagonal lift (Σr, out))."""
        return {
            name: (_rand(rows, d_in), _rand(rows - d_out, d_out))
            for name, (rows, d_in, d_out) in self.stacks.items()
        }


class Activations:
    """Inputs and gradient buffers of every matmul, for micro-batches of `rows` tokens."""

    def __init__(self, layout: Layout, rows: int, length: int) -> None:
        b, t = max(1, rows // length), length
        d, g, hkv = layout.head_dim, layout.group, layout.kv_heads
        self.rows = b * t
        stacks = layout.stacks.items()
        self.inputs = {name: _rand(self.rows, d_in) for name, (_, d_in, _) in stacks}
        self.grads = {name: _rand(self.rows, n) for name, (n, _, _) in stacks}
        self.q = _rand(b, hkv, g * t, d)
        self.k, self.v = _rand(b, hkv, t, d), _rand(b, hkv, t, d)
        self.probs = _rand(b, hkv, g * t, t)


def _stack_forward(x: torch.Tensor, weight: torch.Tensor, lift: torch.Tensor) -> torch.Tensor:
    y = x @ weight.t()  # (N, out + Σr): base outputs and x·Aᵀ
    out_total = lift.size(1)
    y[:, :out_total].addmm_(y[:, out_total:], lift)
    return y


def _stack_backward(
    grads: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, weight: torch.Tensor, lift: torch.Tensor
) -> torch.Tensor:
    out_total = lift.size(1)
    g_out, g_xa = grads[:, :out_total], grads[:, out_total:]
    g_xa.addmm_(g_out, lift.t(), beta=0)
    _ = xa.t() @ g_out  # the Bs' gradients (their blocks of it)
    _ = g_xa.t() @ x  # every A's gradient
    return grads @ weight  # the input's gradient through W and A


def one_pass(
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], acts: list[Activations]
) -> None:
    """Forward through every layer, then backward through them in reverse: matmuls only.
    acts: each layer's activations (one object repeated where they are shared)."""
    xa = []
    for w, a in zip(layers, acts, strict=True):
        xa.append({})
        for name in ("qkv", "o", "gate_up", "down"):
            if name == "o":
                _ = a.q @ a.k.transpose(-1, -2)  # the scores (B, Hkv, G·T, T)
                _ = a.probs @ a.v  # the heads' outputs (B, Hkv, G·T, D)
            weight, lift = w[name]
            xa[-1][name] = _stack_forward(a.inputs[name], weight, lift)[:, lift.size(1) :]
    for w, a, saved in zip(reversed(layers), reversed(acts), reversed(xa), strict=True):
        for name in ("down", "gate_up", "o", "qkv"):
            weight, lift = w[name]
            _stack_backward(a.grads[name], a.inputs[name], saved[name], weight, lift)
            if name == "o":
                g_heads, g_scores = a.q, a.probs  # stand-ins of the right shapes
                _ = g_heads @ a.v.transpose(-1, -2)  # the probabilities' gradient
                _ = a.probs.transpose(-1, -2) @ g_heads  # v's
                _ = g_scores @ a.k  # q's
                _ = g_scores.transpose(-1, -2) @ a.q  # k's


def _seconds(layers: list[Any], acts: list[Activations], reps: int) -> float:
    one_pass(layers, acts)  # warm-up: oneDNN builds each shape's kernel
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        one_pass(layers, acts)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cell(entry: dict[str, float]) -> str:
    return f"{entry['tokens_per_s']:.0f} tok/s MFU {entry['mfu']:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rows", default="128,256,512,1024,2048", help="tokens per micro-batch")
    parser.add_argument("--length", type=int, default=48, help="tokens per sentence")
    parser.add_argument("--reps", type=int, default=5, help="timed passes per size (median)")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    layout = Layout(args.config, args.overrides)
    torch.manual_seed(0)
    distinct = [layout.weights() for _ in range(layout.layers)]
    shared = [distinct[0]] * layout.layers
    flops_per_token = layout.flops_per_token
    rate = matmul_rate(DTYPE)
    rows = []
    for m in sorted({int(k) for k in args.rows.split(",")}):
        a = Activations(layout, m, args.length)
        one_set = [a] * layout.layers
        own = [a] + [Activations(layout, m, args.length) for _ in range(layout.layers - 1)]
        entry: dict[str, Any] = {"rows": a.rows}
        cases = (
            ("distinct", distinct, one_set),
            ("shared", shared, one_set),
            ("own", distinct, own),
        )
        for key, layers, acts in cases:
            seconds = _seconds(layers, acts, args.reps)
            per_s = a.rows / seconds
            entry[key] = {"tokens_per_s": per_s, "mfu": per_s * flops_per_token / rate}
        rows.append(entry)
    rate_after = matmul_rate(DTYPE)
    result = {
        "matmul_flops_per_s": rate,
        "matmul_flops_per_s_after": rate_after,
        "flops_per_token": flops_per_token,
        "threads": torch.get_num_threads(),
        "sizes": rows,
    }
    print(
        f"square bf16 matmul rate {rate / 1e9:.0f} GFLOP/s before, {rate_after / 1e9:.0f} after;"
        f" {flops_per_token / 1e6:.0f} MFLOP a token"
    )
    heads = ("distinct weights", "one layer's weights", "distinct weights, activations")
    print(f"{'rows':>6} " + " ".join(f"{h:>30}" for h in heads))
    for e in rows:
        cells = " ".join(f"{_cell(e[key]):>30}" for key in ("distinct", "shared", "own"))
        print(f"{e['rows']:>6} {cells}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
