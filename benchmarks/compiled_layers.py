"""finlora's fused decoder layers against the same layers as one plain function, eager and
compiled by Inductor: what torch.compile would gain on a training pass.

    .venv/bin/python benchmarks/compiled_layers.py [configs/fpb-smollm2-lora.yaml] [--set ...]
        [--rows 480] [--length 60] [--reps 5] [--modes fused,eager,compiled,dynamic,max-autotune]
        [--json]

Every mode runs one training pass, forward and backward, through all decoder layers of the
config's model with its LoRA settings, on one micro-batch of ROWS unpadded tokens (sentences of
LENGTH tokens), and the loss is a fixed projection of the final norm's output. The model is
built from its config (random weights; none are read) and placed as training places it (bf16
frozen weights and autocast where the CPU pays, `train.fused_decoder`):
- `fused`: the placed model's own decoder stack, i.e. finlora's hand-written autograd halves;
- `eager`: `plain_layer`, the same arithmetic as the fused halves (stacked frozen weights, every
  LoRA A in one product and every B in one block-diagonal product, fp32 norms, rotary and
  softmax, fp32 residual), written as plain tensor code whose backward autograd derives;
- `compiled`: that function under `torch.compile` (dynamic=False, one graph a layer, reused);
- `dynamic`: the same with dynamic=True, the one graph that training's micro-batches of every
  length and size would need (static graphs compile again, ~30 s, for each new shape);
- `max-autotune`: the same with `max_autotune` and Inductor's C++ GEMM templates offered
  (Inductor still picks ATen's GEMMs where it cannot use them: in training the weights are graph
  inputs, not the constants those templates need).

All modes share the model's weights and LoRA parameters, so their losses and gradient norms
agree (the JSON carries both). Modes alternate within each repetition; the median is reported,
with MFU reckoned as `finlora bench train` does, against the square-matrix rate measured before
and after. The compile time of the compiled modes is the first (warm-up) pass's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from finlora.bench import matmul_params, matmul_rate
from finlora.config import load_config
from finlora.errors import FinloraError
from finlora.methods import build_method
from finlora.models import Placement
from finlora.models.loading import model_config

MODES = ("fused", "eager", "compiled", "dynamic", "max-autotune")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A decoder layer's sizes, fixed for a model (constants of the compiled graph)."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    scaling: float
    eps: float
    dtype: torch.dtype  # the compute dtype: autocast's, or fp32


def _lora(module: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(frozen weight, A, B, scaling) of a PEFT LoRA linear with one adapter."""
    if not hasattr(module, "lora_A"):
        raise FinloraError("compiled_layers: every projection needs LoRA (target_modules all)")
    name = module.active_adapters[0]
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    return module.base_layer.weight, a, b, float(module.scaling[name])


class LayerWeights:
    """One decoder layer's tensors as `plain_layer` takes them: the frozen weights stacked as
    the fused path stacks them, and the LoRA parameters themselves (so their gradients land
    on the model's)."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        parts = [_lora(getattr(attn if i < 4 else mlp, n)) for i, n in enumerate(PROJECTIONS)]
        w = [p[0].detach() for p in parts]
        self.frozen = [
            layer.input_layernorm.weight.detach().float(),
            torch.cat(w[:3]),  # q, k, v
            w[3],
            torch.cat(w[4:6]),  # gate, up
            w[6],
            layer.post_attention_layernorm.weight.detach().float(),
        ]
        self.lora = [t for p in parts for t in p[1:3]]
        self.scalings = tuple(p[3] for p in parts)


def _norm(x: torch.Tensor, weight: torch.Tensor, shape: Shape) -> torch.Tensor:
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + shape.eps)
    return (x * rstd * weight).to(shape.dtype)


def _stacked(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora: list[torch.Tensor],
    scalings: tuple[float, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """x·Wᵀ + Σ s·(x·Aᵀ)·Bᵀ for stacked members, as `fused_decoder._Stack` computes it."""
    a = torch.cat([t.to(dtype) for t in lora[0::2]])
    blocks = [(b.t() * s).to(dtype) for b, s in zip(lora[1::2], scalings, strict=True)]
    lift = torch.block_diag(*blocks)
    return x @ weight.t() + (x @ a.t()) @ lift


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> Any:
    x = x.float()
    half = x.size(-1) // 2
    swapped = torch.cat((-x[..., half:], x[..., :half]), -1)
    return (x * cos + swapped * sin).to(dtype)


def plain_layer(shape: Shape, scalings: tuple[float, ...]) -> Callable[..., torch.Tensor]:
    """A Llama decoder layer with LoRA on every projection as one function of
    (x (B, T, d) fp32, cos, sin, mask, *frozen, *lora) -> the layer's output (fp32)."""
    s_qkv, s_o, s_gu, s_down = scalings[:3], scalings[3:4], scalings[4:6], scalings[6:]
    h, hkv, hd, dtype = shape.heads, shape.kv_heads, shape.head_dim, shape.dtype

    def layer(x: torch.Tensor, cos: Any, sin: Any, mask: Any, *tensors: Any) -> torch.Tensor:
        norm1, w_qkv, w_o, w_gu, w_down, norm2 = tensors[:6]
        lora = list(tensors[6:])
        b, t, d = x.shape
        rows = x.reshape(b * t, d)
        qkv = _stacked(_norm(rows, norm1, shape), w_qkv, lora[0:6], s_qkv, dtype)
        q = qkv[:, : h * hd].view(b, t, h, hd).transpose(1, 2)
        k = qkv[:, h * hd : (h + hkv) * hd].view(b, t, hkv, hd).transpose(1, 2)
        v = qkv[:, (h + hkv) * hd :].view(b, t, hkv, hd).transpose(1, 2)
        q, k = _rope(q, cos, sin, dtype), _rope(k, cos, sin, dtype)
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * shape.scaling + mask
        heads = scores.softmax(-1).to(dtype) @ v
        merged = heads.transpose(1, 2).reshape(b * t, h * hd)
        rows = rows + _stacked(merged, w_o, lora[6:8], s_o, dtype).float()
        gate_up = _stacked(_norm(rows, norm2, shape), w_gu, lora[8:12], s_gu, dtype)
        hidden = torch.nn.functional.silu(gate_up[:, : shape.intermediate])
        hidden = hidden * gate_up[:, shape.intermediate :]
        rows = rows + _stacked(hidden, w_down, lora[12:14], s_down, dtype).float()
        return rows.view(b, t, d)

    return layer


class Bench:
    """The placed model, one micro-batch and each mode's training pass."""

    def __init__(self, config: Path | None, overrides: list[str], rows: int, length: int) -> None:
        cfg = load_config(config, overrides)
        model_cfg, _ = model_config(cfg.model.name, cfg.model.trust_remote_code)
        self.placement = Placement.from_config(cfg.train)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(
            model_cfg, attn_implementation=self.placement.attention
        )
        model = build_method(base, cfg, "causal")
        with torch.no_grad():  # B starts at zero: give the adapters a say in the loss
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    param.normal_(0, 0.02, generator=gen)
        self.flops_per_token = 4 * matmul_params(model)
        self.model = self.placement.place(model)
        self.model.train()
        self.inner = self.model.get_base_model().model
        self.layers = [LayerWeights(layer) for layer in self.inner.layers]
        b, t = max(1, rows // length), length
        self.rows = b * t
        d = model_cfg.hidden_size
        self.x = torch.randn(b, t, d)
        self.probe = torch.randn(d) / d**0.5
        positions = torch.arange(t)[None].expand(b, t)
        cos, sin = self.inner.rotary_emb(self.x, positions)
        self.cos, self.sin = cos[:, None].float(), sin[:, None].float()
        self.mask = torch.full((t, t), float("-inf")).triu(1)
        attn = self.inner.layers[0].self_attn
        self.dtype = self.placement.dtype or torch.float32
        self.shape = Shape(
            model_cfg.num_attention_heads,
            model_cfg.num_key_value_heads,
            attn.head_dim,
            model_cfg.intermediate_size,
            float(attn.scaling),
            float(self.inner.norm.variance_epsilon),
            self.dtype,
        )

    def _autocast(self) -> Any:
        return torch.autocast("cpu", self.dtype, enabled=self.placement.dtype is not None)

    def _loss(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.float() @ self.probe).pow(2).mean()

    def fused_pass(self) -> torch.Tensor:
        mask = torch.ones(self.x.shape[:2], dtype=torch.long)
        with self._autocast():
            out = self.inner(inputs_embeds=self.x, attention_mask=mask, use_cache=False)
            hidden = out.last_hidden_state
        # The stacks are built at the first pass of a layer that takes the fused path.
        taken = sum(getattr(m, "_finlora_fused", None) is not None for m in self.inner.layers)
        if taken != len(self.inner.layers):
            raise FinloraError(
                f"compiled_layers: {taken} of {len(self.inner.layers)} decoder layers took the"
                " fused path (it needs eager attention and train.fused_decoder=true)"
            )
        return self._loss(hidden)

    def plain_pass(self, layer: Callable[..., torch.Tensor]) -> torch.Tensor:
        x = self.x
        for w in self.layers:
            x = layer(x, self.cos, self.sin, self.mask, *w.frozen, *w.lora)
        final = dataclasses.replace(self.shape, dtype=torch.float32)  # as transformers' norm
        return self._loss(_norm(x, self.inner.norm.weight.float(), final))

    def passes(self, modes: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
        """Each mode's forward pass, giving the loss to differentiate."""
        if len({w.scalings for w in self.layers}) != 1:
            raise FinloraError("compiled_layers: every layer needs the same LoRA scalings")
        plain = plain_layer(self.shape, self.layers[0].scalings)
        found: dict[str, Callable[[], torch.Tensor]] = {}
        for mode in modes:
            if mode == "fused":
                found[mode] = self.fused_pass
                continue
            layer = plain
            if mode == "max-autotune":
                # Offers Inductor's C++ GEMM templates beside ATen's; it times each candidate.
                options = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
                layer = torch.compile(plain, dynamic=False, options=options)
            elif mode == "compiled":
                layer = torch.compile(plain, dynamic=False)
            elif mode == "dynamic":
                layer = torch.compile(plain, dynamic=True)
            found[mode] = lambda layer=layer: self.plain_pass(layer)
        return found

    def step(self, forward: Callable[[], torch.Tensor]) -> tuple[float, float]:
        """One training pass -> (loss, norm of every LoRA gradient); the gradients are cleared."""
        loss = forward()
        loss.backward()
        grads = [p.grad for w in self.layers for p in w.lora if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        self.model.zero_grad(set_to_none=True)
        return float(loss), norm


def run(bench: Bench, modes: list[str], reps: int) -> dict[str, Any]:
    passes = bench.passes(modes)
    rate = matmul_rate(bench.placement.dtype)
    entries: dict[str, dict[str, Any]] = {}
    for mode, forward in passes.items():
        start = time.perf_counter()
        loss, grad_norm = bench.step(forward)  # compiles, builds the stacks and kernels
        entries[mode] = {"warmup_s": time.perf_counter() - start, "loss": loss}
        entries[mode]["grad_norm"] = grad_norm
    times: dict[str, list[float]] = {mode: [] for mode in passes}
    for _ in range(reps):
        for mode, forward in passes.items():
            start = time.perf_counter()
            bench.step(forward)
            times[mode].append(time.perf_counter() - start)
    rate_after = matmul_rate(bench.placement.dtype)
    for mode, seconds in times.items():
        per_s = bench.rows / statistics.median(seconds)
        entries[mode] |= {"tokens_per_s": per_s, "mfu": per_s * bench.flops_per_token / rate}
    return {
        "rows": bench.rows,
        "dtype": str(bench.dtype),
        "matmul_flops_per_s": rate,
        "matmul_flops_per_s_after": rate_after,
        "flops_per_token": bench.flops_per_token,
        "threads": torch.get_num_threads(),
        "modes": entries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rows", type=int, default=480, help="tokens in the micro-batch")
    parser.add_argument("--length", type=int, default=60, help="tokens per sentence")
    parser.add_argument("--reps", type=int, default=5, help="timed passes per mode (median)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"from {','.join(MODES)}")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        parser.error(f"--modes: choose from {','.join(MODES)} (got {args.modes!r})")
    try:
        result = run(Bench(args.config, args.overrides, args.rows, args.length), modes, args.reps)
    except FinloraError as exc:
        raise SystemExit(f"error: {exc}") from None
    rate, after = result["matmul_flops_per_s"], result["matmul_flops_per_s_after"]
    print(
        f"{result['rows']} rows, {result['dtype']}; square matmul rate {rate / 1e9:.0f} GFLOP/s"
        f" before, {after / 1e9:.0f} after"
    )
    print(
        f"{'mode':>13} {'tokens/s':>9} {'MFU':>6} {'warm-up s':>9} {'loss':>12} {'grad norm':>12}"
    )
    for mode, e in result["modes"].items():
        print(
            f"{mode:>13} {e['tokens_per_s']:>9.0f} {e['mfu']:>6.1%} {e['warmup_s']:>9.1f}"
            f" {e['loss']:>12.6g} {e['grad_norm']:>12.6g}"
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
