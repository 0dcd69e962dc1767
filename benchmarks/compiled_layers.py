"""finlora's fused decoder layers against the same layers as one plain function, eager and
compiled by Inductor: what torch.compile would gain on a training pass.

    .venv/bin/python benchmarks/compiled_layers.py [configs/fpb-smollm2-lora.yaml] [--set ...]
        [--rows 480] [--length 60] [--reps 5] [--modes fused,eager,compiled,dynamic,max-autotune]
        [--json]

Every mode runs one training pass, forward and backward, through all decoder layers of the
config's model with its LoRA settings, on one micro-batch of ROWS unpadded tokens (sentences of
LENGTH tokens), and the loss is a fixed projection of the final norm's output. The model is
built from its config (random weights; none are read) and placed as training places it (bf16
frozen weights and autocast where the CPU pays, `speed.fused_decoder`):
- `fused`: the placed model's own decoder stack, i.e. finlora's hand-written autograd halves
  (the script stops unless every layer runs them). Its pass includes what the model's forward
  does around the layers: the rotary table and the mask;
- `eager`: `plain_layer`, the fused halves' arithmetic as plain tensor code whose backward
  autograd derives: the fused stacks' frozen weights, every LoRA A in one product and every B
  in one block-diagonal product, fp32 norms and rotary products, the attention scaling carried
  by the queries' rotary table, the softmax and residual as the fused halves round them. One
  difference: a graph input cannot take the A rows in place, so x·Wᵀ and x·Aᵀ are two GEMMs
  (and so are their input gradients) where the fused stacks run one;
- `compiled`: that function under `torch.compile(dynamic=False)` (Dynamo makes two graphs: the
  first layer's input needs no gradient);
- `dynamic`: the same with dynamic=True, the one graph that training's micro-batches of every
  length and size would need (static graphs compile again for each new shape);
- `max-autotune`: the same with `max_autotune` and Inductor's C++ GEMM templates offered
  (Inductor picks ATen's GEMMs where it cannot use them: in training the weights are graph
  inputs, not the constants those templates need).

All modes share the model's weights and LoRA parameters: their losses and every LoRA gradient's
norm agree (the JSON carries them, from each mode's warm-up pass, which also holds its compile
time). The timed passes are forward and backward alone. Modes alternate within each repetition;
the median is reported, with MFU reckoned as `finlora bench train` does, against the
square-matrix rate measured before the timed passes (the rate after is reported beside it).
"""

from __future__ import annotations

import argparse
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
from finlora.models.fast.fused_decoder import _norm_forward
from finlora.models.fast.lean_attention import mask_in, sign_folded
from finlora.models.fast.stacked import scaling_of
from finlora.models.loading import model_config
from finlora.scoring import autocast

# torch.compile's arguments for each compiled mode.
COMPILED: dict[str, dict[str, Any]] = {
    "compiled": {"dynamic": False},
    "dynamic": {"dynamic": True},
    "max-autotune": {
        "dynamic": False,
        "options": {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
    },
}
MODES = ("fused", "eager", *COMPILED)


@dataclass(frozen=True)
class Shape:
    """A decoder layer's sizes, fixed for a model (constants of the compiled graph)."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    dtype: torch.dtype  # the compute dtype: autocast's, or fp32


class LayerWeights:
    """One fused layer's tensors as `plain_layer` takes them: its norms, the frozen rows of its
    four stacks (views, no copy), and the LoRA parameters themselves in the stacks' order, so
    their gradients land on the model's."""

    def __init__(self, layer: Any) -> None:
        state = layer._finlora_fused
        if any(len(s.members) != len(s.loras) for s in state.stacks):
            raise FinloraError(
                "compiled_layers: every projection needs LoRA (lora.target_modules: all-linear)"
            )
        self.frozen = [
            layer.input_layernorm.weight.detach().float(),
            *(s.weight[: s.out_total] for s in state.stacks),  # qkv, o, gate_up, down
            layer.post_attention_layernorm.weight.detach().float(),
        ]
        self.lora = [p for s in state.stacks for p in s.params()]
        self.scalings = tuple(scaling_of(lora) for s in state.stacks for _, _, lora in s.members)


def _stacked(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora: list[torch.Tensor],
    scalings: tuple[float, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """x (N, in) -> x·Wᵀ + Σ s·(x·Aᵀ)·Bᵀ (N, out) over a stack's members, as `_Stack` does."""
    a = torch.cat([t.to(dtype) for t in lora[0::2]])  # (Σr, in)
    blocks = [(b.t() * s).to(dtype) for b, s in zip(lora[1::2], scalings, strict=True)]
    return x @ weight.t() + (x @ a.t()) @ torch.block_diag(*blocks)  # lift: (Σr, out)


def _rope(
    x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin in fp32 (as `lean_attention.rotated`), rounded to dtype."""
    x = x.float()
    half = x.size(-1) // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), -1)  # (x₂, x₁)
    return (x * cos + swapped * sin_folded).to(dtype)


def plain_layer(shape: Shape, scalings: tuple[float, ...]) -> Callable[..., torch.Tensor]:
    """A Llama decoder layer with LoRA on every projection, as one function of
    (x (B, T, d) fp32, rope (cos, sin_folded, cos_q, sin_q), mask (T, T), *frozen, *lora) -> the
    layer's output (B, T, d) fp32. cos_q, sin_q carry the attention's scaling."""
    s_qkv, s_o, s_gu, s_down = scalings[:3], scalings[3:4], scalings[4:6], scalings[6:]
    h, hkv, hd, dtype = shape.heads, shape.kv_heads, shape.head_dim, shape.dtype

    def layer(
        x: torch.Tensor, rope: tuple[torch.Tensor, ...], mask: torch.Tensor, *tensors: torch.Tensor
    ) -> torch.Tensor:
        norm1, w_qkv, w_o, w_gu, w_down, norm2 = tensors[:6]
        lora = list(tensors[6:])
        cos, sin, cos_q, sin_q = rope
        b, t, d = x.shape
        rows = x.reshape(b * t, d)
        normed = _norm_forward(rows, norm1, shape.eps, dtype)[0]
        qkv = _stacked(normed, w_qkv, lora[0:6], s_qkv, dtype)  # (N, (H + 2·Hkv)·D)
        q = qkv[:, : h * hd].view(b, t, h, hd).transpose(1, 2)  # (B, H, T, D)
        k = qkv[:, h * hd : (h + hkv) * hd].view(b, t, hkv, hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = qkv[:, (h + hkv) * hd :].view(b, t, hkv, hd).transpose(1, 2)
        q, k = _rope(q, cos_q, sin_q, dtype), _rope(k, cos, sin, dtype)
        # Query head i reads key/value head i // group, as transformers' repeat_kv has it.
        k = k.repeat_interleave(h // hkv, dim=1)  # (B, H, T, D)
        v = v.repeat_interleave(h // hkv, dim=1)
        scores = q @ k.transpose(-1, -2) + mask  # (B, H, T, T), already scaled
        heads = scores.softmax(-1) @ v  # (B, H, T, D)
        merged = heads.transpose(1, 2).reshape(b * t, h * hd)
        rows = rows + _stacked(merged, w_o, lora[6:8], s_o, dtype)  # fp32 residual
        normed = _norm_forward(rows, norm2, shape.eps, dtype)[0]
        gate_up = _stacked(normed, w_gu, lora[8:12], s_gu, dtype)  # (N, 2·I)
        hidden = torch.nn.functional.silu(gate_up[:, : shape.intermediate])
        hidden = hidden * gate_up[:, shape.intermediate :]  # (N, I)
        rows = rows + _stacked(hidden, w_down, lora[12:14], s_down, dtype)
        return rows.view(b, t, d)

    return layer


def _fused_halves(loss: torch.Tensor) -> int:
    """How many fused MLP halves the loss's autograd graph runs back through."""
    seen, todo, count = set(), [loss.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_MlpHalfBackward"
        todo += [child for child, _ in node.next_functions]
    return count


class Bench:
    """The placed model, one micro-batch and each mode's training pass."""

    def __init__(self, config: Path | None, overrides: list[str], rows: int, length: int) -> None:
        cfg = load_config(config, overrides)
        model_cfg, _ = model_config(cfg.model.name)
        self.placement = Placement.from_config(cfg.train, cfg.speed)
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
        b, t = max(1, rows // length), length
        self.rows = b * t
        self.x = torch.randn(b, t, model_cfg.hidden_size)
        self.probe = torch.randn(model_cfg.hidden_size) / model_cfg.hidden_size**0.5
        self.dtype = self.placement.dtype or torch.float32
        attn = self.inner.layers[0].self_attn
        cos, sin = self.inner.rotary_emb(self.x, torch.arange(t)[None].expand(b, t))
        cos, sin = cos[:, None].float(), sign_folded(sin[:, None].float())  # (B, 1, T, D)
        self.rope = (cos, sin, cos * attn.scaling, sin * attn.scaling)
        causal = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)
        self.mask = mask_in(self.dtype)(causal)
        self.shape = Shape(
            heads=model_cfg.num_attention_heads,
            kv_heads=model_cfg.num_key_value_heads,
            head_dim=attn.head_dim,
            intermediate=model_cfg.intermediate_size,
            eps=float(self.inner.norm.variance_epsilon),
            dtype=self.dtype,
        )
        # The first fused pass builds the stacks whose frozen rows the plain function reads.
        halves = _fused_halves(self.fused_pass())
        self.model.zero_grad(set_to_none=True)
        if halves != len(self.inner.layers):
            raise FinloraError(
                f"compiled_layers: {halves} of {len(self.inner.layers)} decoder layers ran the"
                " fused path (it needs eager attention, speed.fused_decoder, no LoRA dropout)"
            )
        self.layers = [LayerWeights(layer) for layer in self.inner.layers]

    def _loss(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.float() @ self.probe).pow(2).mean()

    def fused_pass(self) -> torch.Tensor:
        mask = torch.ones(self.x.shape[:2], dtype=torch.long)
        with autocast(self.placement.device, self.placement.dtype):
            out = self.inner(inputs_embeds=self.x, attention_mask=mask, use_cache=False)
        return self._loss(out.last_hidden_state)

    def plain_pass(self, layer: Callable[..., torch.Tensor]) -> torch.Tensor:
        x = self.x
        for w in self.layers:
            x = layer(x, self.rope, self.mask, *w.frozen, *w.lora)
        # transformers' final norm gives fp32 here.
        return self._loss(
            _norm_forward(x, self.inner.norm.weight.float(), self.shape.eps, x.dtype)[0]
        )

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
            layer = torch.compile(plain, **COMPILED[mode]) if mode in COMPILED else plain
            found[mode] = lambda layer=layer: self.plain_pass(layer)
        return found

    def step(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One training pass, forward and backward; returns the loss. Gradients stay until
        `clear`."""
        loss = forward()
        loss.backward()
        return loss

    def grad_norms(self) -> list[float]:
        """Every LoRA gradient's norm, layer by layer in the stacks' order."""
        return [float(p.grad.norm()) for w in self.layers for p in w.lora if p.grad is not None]

    def clear(self) -> None:
        self.model.zero_grad(set_to_none=True)


def run(bench: Bench, modes: list[str], reps: int) -> dict[str, Any]:
    """Warm every mode up (compiling it), then time them alternately; the JSON result."""
    passes = bench.passes(modes)
    entries: dict[str, dict[str, Any]] = {}
    for mode, forward in passes.items():
        start = time.perf_counter()
        loss = float(bench.step(forward))
        entries[mode] = {"warmup_s": time.perf_counter() - start, "loss": loss}
        entries[mode]["grad_norms"] = norms = bench.grad_norms()
        entries[mode]["grad_norm"] = sum(n * n for n in norms) ** 0.5
        bench.clear()
    rate = matmul_rate(bench.placement.dtype)
    times: dict[str, list[float]] = {mode: [] for mode in passes}
    for _ in range(reps):
        for mode, forward in passes.items():
            start = time.perf_counter()
            bench.step(forward)
            bench.clear()
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
    """Parse the flags, run the modes, print a table (and the JSON with --json)."""
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
    heads = ("mode", "tokens/s", "MFU", "warm-up s", "loss", "grad norm")
    print("{:>13} {:>9} {:>6} {:>9} {:>12} {:>12}".format(*heads))
    for mode, e in result["modes"].items():
        print(
            f"{mode:>13} {e['tokens_per_s']:>9.0f} {e['mfu']:>6.1%} {e['warmup_s']:>9.1f}"
            f" {e['loss']:>12.6g} {e['grad_norm']:>12.6g}"
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
