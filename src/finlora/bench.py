"""Speed benchmarks: finlora's path against the classic PEFT recipe, in one process.

Classic training: every sequence padded to 128 tokens (an instruct config's records: to
data.max_length), fp32, full-vocabulary logits at every position, batch 8; finlora's path
trains as a run does (packed sequences under train.packing). Classic prediction: one greedy
`generate` call per sentence, the answer parsed for a label. Both paths run on the same model
and sentences, alternating rounds so that machine noise hits both alike; throughput counts real
(non-pad) tokens only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finlora.config import RunConfig, load_config
from finlora.data.prepare import prepare_data, prepare_instruct
from finlora.errors import FinloraError
from finlora.memory import PeakMemory
from finlora.methods import build_method, merged_for_inference
from finlora.models import Placement, load_base_model
from finlora.models.fast.fused_projections import fuse_projections
from finlora.scoring import predict_proba
from finlora.tasks import codec_for
from finlora.tasks.classify import IGNORE, length_grouped_batches
from finlora.tasks.instruct import InstructCodec
from finlora.train import accumulate_batch
from finlora.training.data import training_features

CLASSIC_LENGTH = 128
CLASSIC_BATCH = 8


# ---- measuring -----------------------------------------------------------------------------


def matmul_rate(dtype: torch.dtype | None, seconds: float = 2.0, size: int = 1024) -> float:
    """Measured dense matrix-multiply rate of this machine, FLOP/s (bf16 where supported).

    The best of four windows: a window slowed by other work would understate the rate and so
    overstate every MFU figure measured against it.
    """
    dt = dtype or torch.float32
    a, b = torch.randn(size, size, dtype=dt), torch.randn(size, size, dtype=dt)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(4):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 4:
            a @ b
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start))
    return best


def matmul_params(model: Any) -> int:
    """Parameters that take part in a matmul for every token: all but the embedding table and
    the output head.

    finlora applies the head only at label positions, so it is left out whether it is tied to
    the embeddings (SmolLM2) or holds its own weight (untied by `speed.bf16_head`, or a model
    built untied); LoRA costs ~4 x this many FLOPs per token (forward plus the backward pass
    for activations, with no gradients for the frozen weights).
    """
    left_out = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        left_out.add(id(head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in left_out)


@dataclass
class Round:
    seconds: float = 0.0
    units: int = 0  # real tokens (train) or sentences (infer)


# ---- setup ---------------------------------------------------------------------------------


@dataclass
class FinloraPath:
    """finlora's own path as one config sets it up: model, codec, placement and the features it
    trains on (packed under train.packing, as a run packs them)."""

    cfg: RunConfig
    model: Any
    codec: Any  # the task's codec
    placement: Placement
    features: list[Any] = field(default_factory=list)


@dataclass
class BenchSetup:
    cfg: RunConfig
    # The classic recipe's model: fp32 weights, SDPA attention, LoRA dropout 0.05; None when
    # only finlora's paths are timed (`classic=False`).
    classic: Any
    paths: dict[str, FinloraPath]  # "finlora", then one per variant ("speed.fused_lora=false")
    tokenizer: Any
    codec: Any  # the base config's, for the classic path's prompts
    texts: list[str]  # classify: the sentences and their labels; instruct: none
    labels: list[int]
    device: torch.device
    n_params: int
    # The classic path's rows: every token, and the positions of the target tokens.
    classic_rows: list[tuple[list[int], list[int]]] = field(default_factory=list)
    classic_width: int = CLASSIC_LENGTH  # what it pads every row to


CLASSIC_LORA_DROPOUT = 0.05


def _model(cfg: RunConfig, attention: str | None, trust_remote_code: bool) -> tuple[Any, Any]:
    base = load_base_model(cfg.model.name, trust_remote_code, attention)
    torch.manual_seed(cfg.seed)
    return base, build_method(base.model, cfg, base.kind)


def _finlora_path(
    cfg: RunConfig, labels: list[str], rows: list[Any], trust_remote_code: bool
) -> tuple[FinloraPath, Any]:
    placement = Placement.from_config(cfg.train, cfg.speed)
    base, model = _model(cfg, placement.attention, trust_remote_code)
    codec = codec_for(cfg.task, base.tokenizer, cfg.data, labels, base.kind)
    features = training_features(codec, rows, cfg, lambda _: None)
    return FinloraPath(cfg, placement.place(model), codec, placement, features), base


def _classic_rows(codec: Any, rows: list[Any], cfg: RunConfig) -> tuple[list[Any], int]:
    """Each row's tokens and its target positions, and the width the classic recipe pads
    every row to: 128 for a sentence and its label, data.max_length for an instruction."""
    if isinstance(codec, InstructCodec):
        features = [f for f in (codec.encode(r) for r in rows) if f is not None]
        return [(f.ids, list(f.targets)) for f in features], cfg.data.max_length
    out = []
    for e in rows:
        prompt, label = codec.encode_text(e.text), codec.label_ids[codec.labels.index(e.label)]
        out.append((prompt + label, list(range(len(prompt), len(prompt) + len(label)))))
    return out, CLASSIC_LENGTH


# What every path shares: the sentences, their labels and the model they are timed on.
SHARED_KEYS = ("data.", "model.", "task", "seed")


def _check_variant(variant: str) -> None:
    key = variant.split("=", 1)[0].strip()
    if "=" not in variant or not key:
        example = "e.g. speed.fused_lora=false"
        raise FinloraError(f"--variant {variant!r}: expected KEY=VALUE, {example}")
    if key in ("speed.threads", "train.threads"):
        raise FinloraError("bench: threads are process-wide; run once per speed.threads")
    if key.startswith(SHARED_KEYS):
        raise FinloraError(
            f"--variant {variant!r}: every path runs on the same data and model; "
            "set it with --set for all of them"
        )


def setup(
    config: Path | None,
    overrides: list[str],
    n: int,
    variants: list[str] | None = None,
    trust_remote_code: bool = False,
    classic: bool = True,
) -> BenchSetup:
    """The same sentences and LoRA settings for every path, each path with its own model.

    Each variant is one more `KEY=VALUE` override on top of `overrides`: finlora's path with
    one switch changed, timed beside the others so its effect is measured in the same run.
    """
    for variant in variants or []:
        _check_variant(variant)
    cfg = load_config(config, overrides)
    instruct = cfg.task == "instruct"
    data = prepare_instruct(cfg.data, cfg.seed) if instruct else prepare_data(cfg.data, cfg.seed)
    rows: list[Any] = data.rows("train")[:n]
    main, base = _finlora_path(cfg, data.labels, rows, trust_remote_code)
    paths = {"finlora": main}
    for variant in variants or []:
        try:
            variant_cfg = load_config(config, [*overrides, variant])
        except FinloraError as exc:
            raise FinloraError(f"--variant {variant!r}: {exc}") from None
        paths[variant] = _finlora_path(variant_cfg, data.labels, rows, trust_remote_code)[0]
    classic_model = None
    if classic:
        classic_cfg = copy.deepcopy(cfg)
        classic_cfg.lora.lora_dropout = CLASSIC_LORA_DROPOUT
        classic_model = _model(classic_cfg, "sdpa", trust_remote_code)[1]
        classic_model.to(main.placement.device)
    return BenchSetup(
        cfg,
        classic_model,
        paths,
        base.tokenizer,
        main.codec,
        [] if instruct else [e.text for e in rows],
        [] if instruct else [data.labels.index(e.label) for e in rows],
        main.placement.device,
        matmul_params(base.model),
        *_classic_rows(main.codec, rows, cfg),
    )


# ---- training ------------------------------------------------------------------------------


def _classic_train_round(s: BenchSetup, optimizer: torch.optim.Optimizer) -> Round:
    r = Round()
    width = s.classic_width
    for i in range(0, len(s.classic_rows), CLASSIC_BATCH):
        rows = s.classic_rows[i : i + CLASSIC_BATCH]
        ids = torch.full((len(rows), width), s.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for j, (tokens, targets) in enumerate(rows):
            seq = tokens[:width]
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
            kept = [t for t in targets if t < width]
            labels[j, kept] = torch.tensor([seq[t] for t in kept])
        start = time.perf_counter()
        out = s.classic(
            input_ids=ids.to(s.device), attention_mask=mask.to(s.device), labels=labels.to(s.device)
        )  # full (B, width, V) logits
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        r.seconds += time.perf_counter() - start
        r.units += int(mask.sum())
    return r


def _finlora_train_round(
    s: BenchSetup, p: FinloraPath, optimizer: torch.optim.Optimizer, seed: int
) -> Round:
    tc, speed = p.cfg.train, p.cfg.speed
    r = Round()
    for idx in length_grouped_batches(
        [p.codec.width(f) for f in p.features], tc.batch_size, seed, speed.group_by_length
    ):
        start = time.perf_counter()
        _, real_tokens = accumulate_batch(
            p.model, p.codec, [p.features[i] for i in idx], p.cfg, p.placement
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        r.seconds += time.perf_counter() - start
        r.units += real_tokens
    return r


def _alternate(paths: dict[str, Callable[[int], Round]], rounds: int) -> dict[str, dict[str, Any]]:
    """Run every path once a round, after a warm-up round; totals and each round's rate."""
    totals = {name: Round() for name in paths}
    by_round: dict[str, list[float]] = {name: [] for name in paths}
    memory = {name: PeakMemory() for name in paths}
    names = list(paths)
    for i in range(rounds + 1):
        # Reverse the order every other round, so no path always runs right after another.
        for name in names if i % 2 == 0 else names[::-1]:
            with memory[name].measure():
                r = paths[name](i)
            if i == 0:
                continue  # warm-up round: allocator, kernels, caches
            totals[name].seconds += r.seconds
            totals[name].units += r.units
            by_round[name].append(r.units / r.seconds)
    return {
        name: {
            "seconds": t.seconds,
            "units": t.units,
            "per_s": t.units / t.seconds,
            "per_s_by_round": by_round[name],
            "peak_rss_mib": memory[name].peak_mib,
        }
        for name, t in totals.items()
    }


def bench_train(
    config: Path | None = None,
    overrides: list[str] | None = None,
    n: int = 64,
    rounds: int = 2,
    variants: list[str] | None = None,
    trust_remote_code: bool = False,
    classic: bool = True,
) -> dict[str, Any]:
    """Train-step throughput of the classic recipe and finlora's path on the same sentences
    (or, for an instruct config, instruction records); without `classic`, finlora's paths only."""
    s = setup(config, overrides or [], n, variants, trust_remote_code, classic)

    def adamw(model: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    runs: dict[str, Callable[[int], Round]] = {}
    if s.classic is not None:
        s.classic.train()
        classic_opt = adamw(s.classic)
        runs["classic"] = lambda i: _classic_train_round(s, classic_opt)
    for name, p in s.paths.items():
        p.model.train()
        opt = adamw(p.model)
        runs[name] = functools.partial(_finlora_train_round, s, p, opt)
    result = _alternate(runs, rounds)
    dtypes = {name: p.placement.dtype for name, p in s.paths.items()}
    if s.classic is not None:
        dtypes["classic"] = None  # fp32
    rates = {dt: matmul_rate(dt) for dt in set(dtypes.values())}
    main_dtype = dtypes["finlora"]
    out: dict[str, Any] = {
        "n_sentences": len(s.classic_rows),  # the rows every path trains on
        "rounds": rounds,
        "matmul_flops_per_s": rates[main_dtype],
        "matmul_dtype": str(main_dtype or torch.float32),
        "flops_per_token": 4 * s.n_params,
        "threads": torch.get_num_threads(),
    }
    for name, r in result.items():
        # Each path against the matmul rate of its own precision (classic: fp32).
        out[name] = {
            "real_tokens_per_s": r["per_s"],
            "mfu": r["per_s"] * 4 * s.n_params / rates[dtypes[name]],
            "peak_rss_mib": r["peak_rss_mib"],
            "seconds": r["seconds"],
            "real_tokens": r["units"],
            "by_round": r["per_s_by_round"],  # the spread tells a switch's effect from noise
        }
    return _with_ratios(out, list(s.paths)[1:], "real_tokens_per_s")


def _with_ratios(out: dict[str, Any], variants: list[str], unit: str) -> dict[str, Any]:
    """finlora's ratio to classic at the top level (when classic ran); variants apart, each
    with its ratio to classic and to finlora's path."""
    classic = out.get("classic")
    if classic is not None:
        out["ratio"] = out["finlora"][unit] / classic[unit]
    if variants:
        out["variants"] = {}
        for v in variants:
            entry = out.pop(v)
            entry["ratio_to_finlora"] = entry[unit] / out["finlora"][unit]
            if classic is not None:
                entry["ratio"] = entry[unit] / classic[unit]
            out["variants"][v] = entry
    return out


# ---- inference -----------------------------------------------------------------------------


def _classic_infer_round(s: BenchSetup) -> Round:
    tok = s.tokenizer
    labels = s.codec.labels
    r = Round()
    for text in s.texts:
        ids = torch.tensor([s.codec.encode_text(text)], device=s.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = s.classic.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().lower()
        next((label for label in labels if answer.startswith(label)), None)
        r.seconds += time.perf_counter() - start
        r.units += 1
    return r


def _finlora_infer_round(s: BenchSetup, p: FinloraPath, _round: int) -> Round:
    start = time.perf_counter()
    predict_proba(
        p.model,
        p.codec,
        s.texts,
        batch_size=p.cfg.speed.eval_batch_size,
        device=p.placement.device,
        dtype=p.placement.dtype,
        fast=p.cfg.speed.label_logits_only,
        shared_prompt=p.cfg.speed.shared_prompt_scoring,
        trim_padding=p.cfg.speed.trim_padding,
        progress=False,
    )
    return Round(time.perf_counter() - start, len(s.texts))


def bench_infer(
    config: Path | None = None,
    overrides: list[str] | None = None,
    n: int = 64,
    rounds: int = 2,
    variants: list[str] | None = None,
    trust_remote_code: bool = False,
    classic: bool = True,
) -> dict[str, Any]:
    """Sentences/s of one `generate` call per sentence against finlora's batched label scoring;
    without `classic`, finlora's paths only."""
    if load_config(config, overrides or []).task != "classify":
        raise FinloraError("bench infer times label scoring: it needs a task classify config")
    s = setup(config, overrides or [], n, variants, trust_remote_code, classic)
    runs: dict[str, Callable[[int], Round]] = {}
    if s.classic is not None:
        s.classic.eval()
        runs["classic"] = lambda i: _classic_infer_round(s)
    for name, p in s.paths.items():
        if p.cfg.speed.merge_for_inference:
            p.model = merged_for_inference(p.model)
        if p.cfg.speed.fuse_projections:
            fuse_projections(p.model)
        p.model.eval()
        runs[name] = functools.partial(_finlora_infer_round, s, p)
    result = _alternate(runs, rounds)
    out: dict[str, Any] = {
        "n_sentences": len(s.texts),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
    }
    for name, r in result.items():
        out[name] = {
            "sentences_per_s": r["per_s"],
            "peak_rss_mib": r["peak_rss_mib"],
            "seconds": r["seconds"],
            "by_round": r["per_s_by_round"],
        }
    return _with_ratios(out, list(s.paths)[1:], "sentences_per_s")


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
