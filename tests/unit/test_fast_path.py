"""Every speed switch leaves the numbers alone: the fast path (eager attention, logits at label
positions only, bf16-stored frozen weights, fused LoRA layers) against the plain path (SDPA,
full logits, weights re-cast by autocast, PEFT's LoRA forward), on a tiny model, for the
training loss, its gradient and the label scores."""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from finlora.config import RunConfig, load_config
from finlora.data import FPB_LABELS, synthetic_sentiment
from finlora.errors import FinloraError
from finlora.methods import build_method
from finlora.models import Placement, freeze_to_dtype, load_base_model
from finlora.models.device import compile_layers, head_to_dtype, set_gradient_checkpointing
from finlora.models.fast.fused_lora import fuse_lora_layers
from finlora.models.fast.fused_projections import fuse_projections
from finlora.models.fast.lean_attention import lean_attention
from finlora.models.fast.lean_mlp import lean_mlps
from finlora.models.fast.norm_cast import cast_norms_once
from finlora.prompts import PromptTemplate
from finlora.scoring import autocast, label_loglik, loss_fn, unwrap
from finlora.tasks.classify import (
    LabelCodec,
    inference_batches,
    padding_chunks,
    token_budget_chunks,
)
from finlora.train import accumulate_batch

EXAMPLES = synthetic_sentiment(9, seed=5)
CPU = torch.device("cpu")


def _model(cfg: RunConfig, directory: Path, attention: str) -> tuple[Any, LabelCodec]:
    base = load_base_model(str(directory), attention=attention)
    torch.manual_seed(0)
    model = build_method(base.model, cfg, base.kind)
    with torch.no_grad():  # make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                seed = zlib.crc32(name.encode())  # str hash() differs between processes
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    codec = LabelCodec(
        base.tokenizer, PromptTemplate.load("sentiment"), list(FPB_LABELS), base.kind, 128
    )
    return model, codec


def _placed(cfg: RunConfig, directory: Path) -> tuple[Any, LabelCodec, Placement]:
    """`_model` placed as the trainer places it: every switch of `cfg.speed` applied."""
    model, codec = _model(cfg, directory, "eager")
    placement = Placement.from_config(cfg.train, cfg.speed)
    return placement.place(model), codec, placement


def _loss_and_scores(
    model: Any, codec: LabelCodec, fast: bool, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = codec.training_batch([codec.encode(e) for e in EXAMPLES])
    prompts = [codec.encode_text(e.text) for e in EXAMPLES]
    with torch.no_grad(), autocast(CPU, dtype):
        return loss_fn(model, batch, codec.kind, fast), label_loglik(model, codec, prompts, fast)


def test_fast_and_plain_paths_agree_in_fp32(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = tiny_cfg()
    fast_model, codec = _model(cfg, tiny_causal_dir, "eager")
    plain_model, _ = _model(cfg, tiny_causal_dir, "sdpa")
    fast_loss, fast_scores = _loss_and_scores(fast_model.eval(), codec, True, None)
    plain_loss, plain_scores = _loss_and_scores(plain_model.eval(), codec, False, None)
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fast_scores, plain_scores, atol=1e-5, rtol=1e-6)


def test_bf16_frozen_weights_compute_what_autocast_computes(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = tiny_cfg()
    recast, codec = _model(cfg, tiny_causal_dir, "eager")
    stored, _ = _model(cfg, tiny_causal_dir, "eager")
    assert freeze_to_dtype(stored, torch.bfloat16) > 0
    # Trainable LoRA weights stay fp32, so the optimizer keeps full precision.
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)
    a = _loss_and_scores(recast.eval(), codec, True, torch.bfloat16)
    b = _loss_and_scores(stored.eval(), codec, True, torch.bfloat16)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)


def test_bf16_head_computes_what_autocast_computes(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = tiny_cfg()
    recast, codec = _model(cfg, tiny_causal_dir, "eager")
    stored, _ = _model(cfg, tiny_causal_dir, "eager")
    for model in (recast, stored):  # tie the head to the embeddings, as SmolLM2's is
        unwrap(model).lm_head.weight = unwrap(model).model.embed_tokens.weight
    assert head_to_dtype(stored, torch.bfloat16)
    head, embeddings = unwrap(stored).lm_head.weight, unwrap(stored).model.embed_tokens.weight
    assert head.dtype == torch.bfloat16 and not head.requires_grad
    assert embeddings.dtype == torch.float32  # untied: the input side keeps full precision
    assert not head_to_dtype(stored, torch.bfloat16)  # already bf16: nothing to do
    a = _loss_and_scores(recast.eval(), codec, True, torch.bfloat16)
    b = _loss_and_scores(stored.eval(), codec, True, torch.bfloat16)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)


def test_bf16_head_generates_the_same_answers(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    """Generation applies the head at every new token, through the model's own forward."""
    (plain, _), (stored, _) = (_merged(tiny_cfg(), tiny_causal_dir, True) for _ in range(2))
    for model in (plain, stored):
        unwrap(model).lm_head.weight = unwrap(model).model.embed_tokens.weight
    assert head_to_dtype(stored, torch.bfloat16)
    ids = torch.tensor([[5, 9, 13, 2, 7], [3, 3, 8, 11, 4]])
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), autocast(CPU, torch.bfloat16):
        assert torch.equal(stored.generate(ids, **options), plain.generate(ids, **options))


def test_bf16_placement_lets_go_of_the_checkpoint_file(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    """Loaded weights are views into the mapped safetensors file; after the bf16 casts the fp32
    tensors left (embeddings, norms) are copied out, so no view keeps the map open."""
    cfg = tiny_cfg()
    plain, codec = _model(cfg, tiny_causal_dir, "eager")
    placed, _ = _model(cfg, tiny_causal_dir, "eager")
    loaded = [t.data for t in [*placed.parameters(), *placed.buffers()]]  # kept: no reuse
    storages = {t.untyped_storage().data_ptr() for t in loaded}
    Placement(CPU, torch.bfloat16, "eager", fused_lora=False, lean_mlp=False).place(placed)
    left = [t for t in [*placed.parameters(), *placed.buffers()] if t.dtype == torch.float32]
    assert left and not {t.untyped_storage().data_ptr() for t in left} & storages
    assert unwrap(placed).model.embed_tokens.weight.dtype == torch.float32
    a = _loss_and_scores(plain.eval(), codec, True, torch.bfloat16)
    b = _loss_and_scores(placed.eval(), codec, True, torch.bfloat16)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)


def test_trainable_head_keeps_its_weight(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    model, _ = _model(tiny_cfg(), tiny_causal_dir, "eager")
    unwrap(model).lm_head.weight.requires_grad_(True)  # e.g. full fine-tuning
    assert not head_to_dtype(model, torch.bfloat16)
    assert unwrap(model).lm_head.weight.dtype == torch.float32


def test_placement_resolves_auto_for_the_cpu(tiny_cfg: Callable[..., RunConfig]) -> None:
    cfg = tiny_cfg("speed.attention=auto")
    placement = Placement.from_config(cfg.train, cfg.speed)
    assert placement.device.type == "cpu"
    assert placement.attention == "eager"
    assert placement.dtype is None  # the tiny config asks for fp32


def test_token_budget_chunks_cap_padded_tokens() -> None:
    lengths = [10, 40, 12, 38, 11, 9]
    chunks = token_budget_chunks(lengths, 80)
    assert sorted(i for c in chunks for i in c) == list(range(6))
    for chunk in chunks:
        assert len(chunk) * max(lengths[i] for i in chunk) <= 80
    assert chunks[0] == [1, 3]  # the two long rows together, longest first
    assert token_budget_chunks(lengths, None) == [[1, 3, 2, 4, 0, 5]]
    assert token_budget_chunks([100, 5], 50) == [[0], [1]]  # too long for the budget: alone
    assert token_budget_chunks([], None) == token_budget_chunks([], 80) == []  # no rows


def _brute_force_cost(lengths: list[int], max_rows: int, pass_cost: int) -> int:
    """The least cost of any cut of the sorted lengths into runs of at most `max_rows`."""
    ordered = sorted(lengths, reverse=True)
    n, best = len(ordered), None
    for mask in range(2 ** (n - 1)):  # bit b set: a cut after sorted row b
        starts = [0] + [b + 1 for b in range(n - 1) if mask >> b & 1] + [n]
        runs = [ordered[a:z] for a, z in itertools.pairwise(starts)]
        if any(len(r) > max_rows for r in runs):
            continue
        cost = sum(len(r) * r[0] + pass_cost for r in runs)
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


def test_padding_chunks_find_the_cheapest_cut() -> None:
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 9))]
        max_rows, pass_cost = rng.randint(1, 6), rng.randint(0, 40)
        chunks = padding_chunks(lengths, max_rows, pass_cost)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
        assert all(len(c) <= max_rows for c in chunks)
        # each run longest first, runs in order: the sorted order, cut
        assert [i for c in chunks for i in c] == sorted(
            range(len(lengths)), key=lambda i: -lengths[i]
        )
        cost = sum(len(c) * lengths[c[0]] + pass_cost for c in chunks)
        assert cost == _brute_force_cost(lengths, max_rows, pass_cost)


def test_padding_chunks_cut_only_where_it_pays() -> None:
    # Two long rows and four short ones: apart, 200 + 40 tokens and two passes instead of 600.
    assert padding_chunks([100, 10, 10, 100, 10, 10], 8, 64) == [[0, 3], [1, 2, 4, 5]]
    assert padding_chunks([30, 28, 29, 30], 8, 64) == [[0, 3, 2, 1]]  # little to save
    assert padding_chunks([30, 20, 29, 30], 3, 64) == [[0, 3, 2], [1]]  # cheapest within 3 rows
    assert padding_chunks([], 4) == []
    assert inference_batches([5, 9, 7], 2, trim=False) == [[1, 2], [0]]


def test_auto_micro_batches_follow_the_precision() -> None:
    fp32, bf16 = Placement(CPU, None, "eager"), Placement(CPU, torch.bfloat16, "eager")
    assert fp32.batch_tokens("auto") == 448  # the FPB run under 2.5 GB in fp32
    assert bf16.batch_tokens("auto") == 512  # less activation memory a token
    assert bf16.batch_tokens(64) == 64 and bf16.batch_tokens(None) is None  # as set


def test_micro_batches_give_the_whole_batch_gradient(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    grads = []
    for budget in ("null", "40"):
        cfg = tiny_cfg(f"speed.max_batch_tokens={budget}")
        model, codec = _model(cfg, tiny_causal_dir, "eager")
        features = [codec.encode(e) for e in EXAMPLES]
        widths = [len(f.prompt_ids) + 1 for f in features]
        assert len(token_budget_chunks(widths, 40)) > 1  # the budget does split this batch
        loss, real = accumulate_batch(model, codec, features, cfg, Placement(CPU, None, ""))
        grads.append((loss, real, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (whole_loss, whole_real, whole), (micro_loss, micro_real, micro) = grads
    assert whole_real == micro_real
    assert abs(whole_loss - micro_loss) < 1e-5
    for a, b in zip(whole, micro, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradient(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, every: int
) -> None:
    grads = []
    for on in (False, True):
        cfg = tiny_cfg(
            f"speed.gradient_checkpointing={str(on).lower()}",
            f"speed.gradient_checkpointing_every={every}",
        )
        model, codec = _model(cfg, tiny_causal_dir, "eager")
        set_gradient_checkpointing(
            model, cfg.speed.gradient_checkpointing, cfg.speed.gradient_checkpointing_every
        )
        model.train()
        assert unwrap(model).is_gradient_checkpointing == on
        features = [codec.encode(e) for e in EXAMPLES]
        loss, _ = accumulate_batch(model, codec, features, cfg, Placement(CPU, None, ""))
        grads.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (plain_loss, plain), (ckpt_loss, ckpt) = grads
    assert abs(plain_loss - ckpt_loss) < 1e-6
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _loss_grads_scores(
    model: Any, codec: LabelCodec, cfg: RunConfig, dtype: torch.dtype | None
) -> tuple[float, list[torch.Tensor], torch.Tensor]:
    model.train()
    features = [codec.encode(e) for e in EXAMPLES]
    loss, _ = accumulate_batch(model, codec, features, cfg, Placement(CPU, dtype, ""))
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return loss, grads, _loss_and_scores(model.eval(), codec, True, dtype)[1]


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b, strict=True))
    return (diff / sum(float((y**2).sum()) for y in b)) ** 0.5


def test_fused_lora_gives_the_same_loss_gradient_and_scores(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = tiny_cfg()
    peft_model, codec = _model(cfg, tiny_causal_dir, "eager")
    fused_model, _ = _model(cfg, tiny_causal_dir, "eager")
    fused_model = Placement(CPU, None, "eager", fused_lora=True).place(fused_model)
    assert fuse_lora_layers(fused_model) == 0  # place() fused them all already
    assert not hasattr(unwrap(peft_model).model.layers[0].self_attn.q_proj, "_peft_forward")
    # Only the forward changed: the parameters and the saved adapter are PEFT's.
    assert list(fused_model.state_dict()) == list(peft_model.state_dict())

    peft_loss, peft_grads, peft_scores = _loss_grads_scores(peft_model, codec, cfg, None)
    fused_loss, fused_grads, fused_scores = _loss_grads_scores(fused_model, codec, cfg, None)
    assert abs(peft_loss - fused_loss) < 1e-6
    for a, b in zip(fused_grads, peft_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused_scores, peft_scores, atol=1e-5, rtol=1e-6)


def test_fused_lora_under_bf16_autocast_is_as_close_to_fp32_as_peft(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = tiny_cfg()
    peft_model, codec = _model(cfg, tiny_causal_dir, "eager")
    fused_model, _ = _model(cfg, tiny_causal_dir, "eager")
    fuse_lora_layers(fused_model)
    ref_loss, ref_grads, ref_scores = _loss_grads_scores(peft_model, codec, cfg, None)
    peft_loss, peft_grads, _ = _loss_grads_scores(peft_model, codec, cfg, torch.bfloat16)
    fused_loss, fused_grads, fused_scores = _loss_grads_scores(
        fused_model, codec, cfg, torch.bfloat16
    )
    # bf16 keeps ~3 significant digits, and this tiny random model with a large adapter
    # amplifies rounding, so bf16 gradients stray far from fp32 on either path: the fused
    # layer must stray no further than PEFT's does (a wrong scaling would stray by >100%).
    assert abs(fused_loss - ref_loss) < max(2 * abs(peft_loss - ref_loss), 0.02)
    torch.testing.assert_close(fused_scores, ref_scores, atol=0.05, rtol=0.02)
    peft_error = _relative_error(peft_grads, ref_grads)
    assert _relative_error(fused_grads, ref_grads) < 2 * peft_error + 0.02


def test_fused_lora_hands_merge_and_disable_to_peft(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = tiny_cfg()
    model, codec = _model(cfg, tiny_causal_dir, "eager")
    fuse_lora_layers(model)
    ids = torch.tensor([codec.encode_text(e.text) for e in EXAMPLES[:1]])
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter matters here
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_placement_can_keep_peft_lora_forward(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = tiny_cfg("speed.fused_lora=false")
    model, _ = _model(cfg, tiny_causal_dir, "eager")
    placed = Placement.from_config(cfg.train, cfg.speed).place(model)
    layer = unwrap(placed).model.layers[0].self_attn.q_proj
    assert not hasattr(layer, "_peft_forward")


def test_fused_lora_skips_layers_whose_base_has_hooks(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    # A hook on the base layer (accelerate's device placement, say) must still run, so that
    # layer keeps PEFT's forward, which calls the base layer as a module.
    model, _ = _model(tiny_cfg(), tiny_causal_dir, "eager")
    q_proj = unwrap(model).model.layers[0].self_attn.q_proj
    calls: list[int] = []
    q_proj.base_layer.register_forward_hook(lambda *_: calls.append(1))
    lora_layers = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert fuse_lora_layers(model) == lora_layers - 1
    assert not hasattr(q_proj, "_peft_forward")
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert calls == [1]


def test_compiled_layers_give_the_same_loss_and_gradient(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    results = []
    for compiled in (False, True):
        cfg = tiny_cfg(f"speed.compile={str(compiled).lower()}")
        model, codec, placement = _placed(cfg, tiny_causal_dir)
        assert placement.compile is compiled
        features = [codec.encode(e) for e in EXAMPLES]
        loss, _ = accumulate_batch(model, codec, features, cfg, placement)
        results.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (eager_loss, eager), (compiled_loss, compiled_grads) = results
    assert abs(eager_loss - compiled_loss) < 1e-5
    for a, b in zip(eager, compiled_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compile_needs_a_decoder_layer_stack() -> None:
    with pytest.raises(FinloraError, match="no decoder layer stack"):
        compile_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("flags", "speedup", "auto", "bf16"),
    [
        (True, 5.8, torch.bfloat16, torch.bfloat16),  # AMX
        (True, 0.59, None, torch.bfloat16),  # bf16 instructions, slower than fp32: auto says no
        (False, 0.0, None, "error"),  # no bf16 instructions (never probed)
    ],
)
def test_auto_precision_takes_bf16_on_a_cpu_only_where_it_is_faster(
    monkeypatch: pytest.MonkeyPatch, flags: bool, speedup: float, auto: Any, bf16: Any
) -> None:
    from finlora.models import device

    def probe(threads: int, rows: int = 512) -> float:
        assert flags, "bf16 timed on a CPU without bf16 instructions"
        return speedup

    monkeypatch.setattr(device, "cpu_has_bf16", lambda: flags)
    monkeypatch.setattr(device, "cpu_bf16_speedup", probe)
    assert device.pick_autocast_dtype(CPU, "auto") == auto
    assert device.pick_autocast_dtype(CPU, "fp32") is None
    if bf16 == "error":
        with pytest.raises(FinloraError, match="bf16 is not supported"):
            device.pick_autocast_dtype(CPU, "bf16")
    else:
        assert device.pick_autocast_dtype(CPU, "bf16") == bf16


def test_bf16_speedup_probe_times_both_precisions() -> None:
    from finlora.models.device import cpu_bf16_speedup

    assert cpu_bf16_speedup(torch.get_num_threads(), rows=8) > 0


def _step_keeping(model: Any, codec: LabelCodec) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """One training step's loss and gradients, and the bytes of activations autograd kept for
    its backward (weights, which it keeps too, are there anyway)."""
    saved: list[int] = []
    weights = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved.append(t.numel() * t.element_size())
        return t

    batch = codec.training_batch([codec.encode(e) for e in EXAMPLES])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, batch, codec.kind, True)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return loss.detach(), grads, sum(saved)


def test_lean_mlp_gives_bit_identical_gradients_and_keeps_less(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    results = []
    for lean in (False, True):
        model, codec, _ = _placed(tiny_cfg(f"speed.lean_mlp={str(lean).lower()}"), tiny_causal_dir)
        results.append(_step_keeping(model, codec))
    (loss, grads, kept), (lean_loss, lean_grads, lean_kept) = results
    assert torch.equal(loss, lean_loss)
    for a, b in zip(grads, lean_grads, strict=True):
        assert torch.equal(a, b)  # same ops in the same order: equal to the bit
    # The tiny model's MLP is 64 wide beside a 32-wide residual: one of its four kept
    # (tokens x 64) tensors gone is a clear cut in what the step keeps.
    assert lean_kept < 0.95 * kept
    assert lean_mlps(torch.nn.Linear(2, 2)) == 0  # nothing gated to make lean


@pytest.mark.parametrize("form", ["peft", "fused", "merged"])
def test_norms_cast_once_give_bit_identical_bf16_scores(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, form: str
) -> None:
    def build() -> Any:
        model, codec = _model(tiny_cfg(), tiny_causal_dir, "eager")
        if form == "merged":
            model = model.merge_and_unload()
        freeze_to_dtype(model, torch.bfloat16)
        if form == "fused":
            assert fuse_lora_layers(model) > 0
        return model.eval(), codec

    (plain, codec), (cast, _) = build(), build()
    assert cast_norms_once(cast) == 4  # 2 layers x (input, post-attention) norms
    plain_loss, plain_scores = _loss_and_scores(plain, codec, True, torch.bfloat16)
    cast_loss, cast_scores = _loss_and_scores(cast, codec, True, torch.bfloat16)
    assert torch.equal(cast_scores, plain_scores) and torch.equal(cast_loss, plain_loss)
    # The hook did act: the norm hands bf16 on in inference, fp32 while gradients are taken.
    layer = unwrap(cast).get_decoder().layers[0]
    x = torch.randn(1, 3, layer.input_layernorm.weight.numel())
    with autocast(CPU, torch.bfloat16):
        with torch.no_grad():
            assert layer.input_layernorm(x).dtype == torch.bfloat16
        assert layer.input_layernorm(x).dtype == torch.float32


def test_norms_cast_once_leaves_other_consumers_alone(
    tiny_overrides: list[str], tiny_causal_dir: Path
) -> None:
    """An IA3 projection scales its input in fp32 first: its norm keeps handing on fp32."""
    shared = [o for o in tiny_overrides if not o.startswith("lora.")]
    cfg = load_config(None, [*shared, "method.name=ia3",
                             "ia3.target_modules=[q_proj,k_proj,v_proj,down_proj]",
                             "ia3.feedforward_modules=[q_proj]"])  # fmt: skip
    model, _ = _model(cfg, tiny_causal_dir, "eager")
    assert cast_norms_once(model) == 2  # only the post-attention norms (gate, up are plain)


def _merged(cfg: RunConfig, directory: Path, bf16: bool) -> tuple[Any, LabelCodec]:
    model, codec = _model(cfg, directory, "eager")
    model = model.merge_and_unload().eval()
    if bf16:
        freeze_to_dtype(model, torch.bfloat16)
        cast_norms_once(model)  # the two compose: q, k and v then get one bf16 tensor
    return model, codec


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_projections_keep_scores_weights_and_memory(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, bf16: bool
) -> None:
    (plain, codec), (fused, _) = (_merged(tiny_cfg(), tiny_causal_dir, bf16) for _ in range(2))
    weights = {k: v.clone() for k, v in fused.state_dict().items()}
    assert fuse_projections(fused) == 4  # 2 layers x (q/k/v, gate/up)
    dtype = torch.bfloat16 if bf16 else None
    plain_loss, plain_scores = _loss_and_scores(plain, codec, True, dtype)
    fused_loss, fused_scores = _loss_and_scores(fused, codec, True, dtype)
    tol = {"atol": 2e-2, "rtol": 1e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-6}
    torch.testing.assert_close(fused_scores, plain_scores, **tol)
    torch.testing.assert_close(fused_loss, plain_loss, **tol)
    # Same parameters and values; the layers' weights are slices of one tensor, not copies.
    assert weights.keys() == fused.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in fused.state_dict().items())
    attention = unwrap(fused).get_decoder().layers[0].self_attn
    storage = {attention.q_proj.weight.untyped_storage().data_ptr(),
               attention.k_proj.weight.untyped_storage().data_ptr(),
               attention.v_proj.weight.untyped_storage().data_ptr()}  # fmt: skip
    assert len(storage) == 1
    assert attention.q_proj._finlora_group._input is None  # nothing held after the pass
    assert fuse_projections(fused) == 0  # already stacked


def test_fused_projections_give_the_same_greedy_answers(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    """Generation calls the layers one new token at a time, over a key/value cache."""
    (plain, _), (fused, _) = (_merged(tiny_cfg(), tiny_causal_dir, False) for _ in range(2))
    fuse_projections(fused)
    ids = torch.tensor([[5, 9, 13, 2, 7], [3, 3, 8, 11, 4]])
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(fused.generate(ids, **options), plain.generate(ids, **options))


def test_fused_projections_step_aside_for_gradients_and_copies(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    (plain, codec), (fused, _) = (_merged(tiny_cfg(), tiny_causal_dir, False) for _ in range(2))
    fuse_projections(fused)
    attention = unwrap(fused).get_decoder().layers[0].self_attn
    x = torch.randn(2, 3, attention.q_proj.in_features, requires_grad=True)
    y = attention.k_proj(x)  # with gradients: k's own matmul, so x gets k's gradient alone
    y.sum().backward()
    expected = attention.k_proj.weight.sum(0).expand_as(x)
    torch.testing.assert_close(x.grad, expected)
    # A dtype change copies each weight out of the stacked tensor: the layers compute alone.
    plain.double(), fused.double()
    assert not attention.q_proj._finlora_group.intact()
    _, plain_scores = _loss_and_scores(plain, codec, True, None)
    _, fused_scores = _loss_and_scores(fused, codec, True, None)
    assert torch.equal(fused_scores, plain_scores)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("merged", [False, True])
def test_lean_attention_gives_the_same_scores(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, bf16: bool, merged: bool
) -> None:
    """Rows of unequal length (padded), grouped key/value heads (4 query heads, 2 kv heads),
    with the adapter merged and stacked projections (prediction) or LoRA layers as trained."""
    (plain, codec), (lean, _) = (_model(tiny_cfg(), tiny_causal_dir, "eager") for _ in range(2))
    if merged:
        plain, lean = plain.merge_and_unload(), lean.merge_and_unload()
        fuse_projections(lean)
    if bf16:
        freeze_to_dtype(plain, torch.bfloat16), freeze_to_dtype(lean, torch.bfloat16)
    assert lean_attention(lean) == 2
    dtype = torch.bfloat16 if bf16 else None
    plain_loss, plain_scores = _loss_and_scores(plain.eval(), codec, True, dtype)
    lean_loss, lean_scores = _loss_and_scores(lean.eval(), codec, True, dtype)
    if bf16:  # the same roundings in the same places: equal to the bit
        assert torch.equal(lean_scores, plain_scores) and torch.equal(lean_loss, plain_loss)
    else:
        torch.testing.assert_close(lean_scores, plain_scores, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(lean_loss, plain_loss, atol=1e-5, rtol=1e-6)
    assert lean_attention(lean) == 0  # already lean


def test_lean_attention_keeps_padding_rows_finite(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    """A left-padded query sees no key at all; under bf16 its weights must not become NaN
    (fp32's lowest mask value is -inf in bf16) and spread to the real rows."""
    (plain, _), (lean, _) = (_merged(tiny_cfg(), tiny_causal_dir, True) for _ in range(2))
    lean_attention(lean)
    ids = torch.tensor([[5, 9, 13, 2, 7, 4], [3, 3, 8, 11, 4, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad(), autocast(CPU, torch.bfloat16):
        a, b = (unwrap(m).get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
                .last_hidden_state for m in (plain, lean))  # fmt: skip
    assert torch.isfinite(b).all()
    assert torch.equal(a[mask.bool()], b[mask.bool()])


def test_lean_attention_steps_aside_for_gradients_and_caches(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    (plain, codec), (lean, _) = (_merged(tiny_cfg(), tiny_causal_dir, False) for _ in range(2))
    lean_attention(lean)
    ids = torch.tensor([[5, 9, 13, 2, 7], [3, 3, 8, 11, 4]])
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():  # generation: one new token at a time over a key/value cache
        assert torch.equal(lean.generate(ids, **options), plain.generate(ids, **options))
    (plain, codec), (lean, _) = (_model(tiny_cfg(), tiny_causal_dir, "eager") for _ in range(2))
    lean_attention(lean)
    batch = codec.training_batch([codec.encode(e) for e in EXAMPLES])
    for model in (plain, lean):
        loss_fn(model, batch, codec.kind, True).backward()
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(plain.named_parameters(), lean.parameters(),
                                                      strict=True) if p.requires_grad]  # fmt: skip
    assert grads  # the LoRA weights; transformers' own forward with gradients: the same bits
    assert all(torch.equal(a, b) for _, a, b in grads)


def test_fused_projections_leave_adapter_layers_alone(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = tiny_cfg("lora.target_modules=[q_proj,k_proj,v_proj,o_proj]")
    model, _ = _model(cfg, tiny_causal_dir, "eager")
    assert fuse_projections(model) == 2  # the MLPs' gate/up; q/k/v are LoRA layers
