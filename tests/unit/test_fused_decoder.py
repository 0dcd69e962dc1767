"""Fused decoder layers (`speed.fused_decoder`) train to the same loss and gradients as the
modules' own forward, on the tiny Llama (grouped-query attention, padded rows), and hand every
case they do not cover back to that forward."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import finlora.models.fast.fused_decoder as fused_decoder
from finlora.config import RunConfig
from finlora.data import FPB_LABELS, synthetic_sentiment
from finlora.methods import build_method, merged_for_inference
from finlora.models import Placement, freeze_to_dtype, load_base_model
from finlora.models.device import set_gradient_checkpointing
from finlora.models.fast.fused_decoder import fused_decoders
from finlora.prompts import PromptTemplate
from finlora.scoring import autocast, label_loglik, unwrap
from finlora.tasks.classify import LabelCodec
from finlora.train import accumulate_batch

EXAMPLES = synthetic_sentiment(9, seed=7)  # rows of several lengths: padded micro-batches
CPU = torch.device("cpu")


def _model(cfg: RunConfig, directory: Path) -> tuple[Any, LabelCodec]:
    base = load_base_model(str(directory), attention="eager")
    torch.manual_seed(0)
    model = build_method(base.model, cfg, base.kind)
    with torch.no_grad():  # B starts at zero: give the adapter a say in the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                seed = zlib.crc32(name.encode())
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    template = PromptTemplate.load("sentiment")
    return model, LabelCodec(base.tokenizer, template, list(FPB_LABELS), base.kind, 128)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the fused attention halves run."""
    calls: list[int] = []
    apply = fused_decoder._AttentionHalf.apply

    def counted(*args: Any) -> Any:
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(fused_decoder._AttentionHalf, "apply", counted)
    return calls


def _train_step(
    model: Any, codec: LabelCodec, cfg: RunConfig, dtype: torch.dtype | None
) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    features = [codec.encode(e) for e in EXAMPLES]
    loss, _ = accumulate_batch(model, codec, features, cfg, Placement(CPU, dtype, ""))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss, grads


def _assert_same_gradients(fused: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> None:
    """Every gradient equal within fp32 rounding, on the scale of its own tensor. The fused
    GEMMs sum in another order (stacked matrices), and how the BLAS orders its sums differs
    between CPUs: on an AMD EPYC elements sat up to 1.8e-6 off in tensors whose largest is 0.11,
    past a bound of 1e-6 + 1e-5 relative near zero. A missed term or a wrong scaling is off by
    far more than 1e-4 of the tensor's largest element."""
    assert list(fused) == list(plain)
    for name, grad in plain.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(fused[name], grad, atol=1e-4 * scale + 1e-9, rtol=0, msg=name)


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum(float(((a[n] - b[n]) ** 2).sum()) for n in b)
    return (diff / sum(float((g**2).sum()) for g in b.values())) ** 0.5


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("speed.max_batch_tokens=64",),  # several micro-batches add up their gradients
        ("lora.target_modules=[q_proj,v_proj,down_proj]",),  # frozen plain projections too
    ],
)
def test_fused_layers_give_the_same_loss_and_gradients_in_fp32(
    tiny_cfg: Callable[..., RunConfig],
    tiny_causal_dir: Path,
    fused_calls: list[int],
    overrides: tuple[str, ...],
) -> None:
    cfg = tiny_cfg(*overrides)
    plain, codec = _model(cfg, tiny_causal_dir)
    fused, _ = _model(cfg, tiny_causal_dir)
    assert fused_decoders(fused) == len(unwrap(fused).model.layers)
    plain_loss, plain_grads = _train_step(plain, codec, cfg, None)
    assert not fused_calls
    fused_loss, fused_grads = _train_step(fused, codec, cfg, None)
    assert fused_calls  # the fused path ran
    assert abs(fused_loss - plain_loss) < 1e-6
    _assert_same_gradients(fused_grads, plain_grads)
    # Same parameters and values: the frozen weights only moved into the stacked matrices.
    plain_state, fused_state = plain.state_dict(), fused.state_dict()
    assert list(fused_state) == list(plain_state)
    for name, value in plain_state.items():
        assert torch.equal(fused_state[name], value), name


def test_fused_layers_under_bf16_autocast_stay_as_close_to_fp32_as_the_modules(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, fused_calls: list[int]
) -> None:
    cfg = tiny_cfg()
    reference, codec = _model(cfg, tiny_causal_dir)
    plain, _ = _model(cfg, tiny_causal_dir)
    fused, _ = _model(cfg, tiny_causal_dir)
    for model in (plain, fused):
        freeze_to_dtype(model, torch.bfloat16)  # as training places them under bf16
    fused_decoders(fused)
    ref_loss, ref_grads = _train_step(reference, codec, cfg, None)
    plain_loss, plain_grads = _train_step(plain, codec, cfg, torch.bfloat16)
    fused_loss, fused_grads = _train_step(fused, codec, cfg, torch.bfloat16)
    assert fused_calls
    # bf16 keeps ~3 significant digits and this tiny random model amplifies rounding: the fused
    # layers must stray from fp32 no further than the modules' own bf16 forward does (a wrong
    # scaling or a missed term strays by far more).
    assert abs(fused_loss - ref_loss) <= max(2 * abs(plain_loss - ref_loss), 1e-3)
    plain_error = _relative_error(plain_grads, ref_grads)
    assert _relative_error(fused_grads, ref_grads) < 2 * plain_error + 0.01


def test_fused_layers_match_under_gradient_checkpointing(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, fused_calls: list[int]
) -> None:
    cfg = tiny_cfg("speed.gradient_checkpointing=true")
    results = []
    for fuse in (False, True):
        model, codec = _model(cfg, tiny_causal_dir)
        set_gradient_checkpointing(model, True, 1)
        if fuse:
            fused_decoders(model)
        results.append(_train_step(model, codec, cfg, None))
    assert fused_calls
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results
    assert abs(fused_loss - plain_loss) < 1e-6
    _assert_same_gradients(fused_grads, plain_grads)


def test_scoring_and_merging_after_fused_training_use_the_trained_weights(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, fused_calls: list[int]
) -> None:
    """Scoring (no gradients) takes the modules' forward; a merge folds the adapter into the
    stacked weights' slices, and the stacks are let go once the weights are no longer theirs."""
    cfg = tiny_cfg()
    plain, codec = _model(cfg, tiny_causal_dir)
    fused, _ = _model(cfg, tiny_causal_dir)
    fused_decoders(fused)
    for model in (plain, fused):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        model.train()
        accumulate_batch(
            model, codec, [codec.encode(e) for e in EXAMPLES], cfg, Placement(CPU, None, "")
        )
        optimizer.step()
    assert fused_calls
    prompts = [codec.encode_text(e.text) for e in EXAMPLES]
    calls = len(fused_calls)
    scores = []
    for model in (plain, fused):
        model.eval()
        with torch.no_grad(), autocast(CPU, None):
            adapted = label_loglik(model, codec, prompts, True)
            merged = label_loglik(merged_for_inference(model), codec, prompts, True)
        scores.append((adapted, merged))
    assert len(fused_calls) == calls  # inference never takes the training path
    (plain_adapted, plain_merged), (fused_adapted, fused_merged) = scores
    torch.testing.assert_close(fused_adapted, plain_adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_merged, plain_merged, atol=1e-5, rtol=1e-5)
    layer = unwrap(fused).model.layers[0]
    layer.train()
    config = unwrap(fused).config
    head = config.hidden_size // config.num_attention_heads
    rotary = (torch.ones(1, 2, head), torch.zeros(1, 2, head))
    with torch.no_grad():  # any call after the merge notices the weights moved
        layer(torch.zeros(1, 2, config.hidden_size), position_embeddings=rotary)
    assert layer._finlora_fused is None


def test_layers_the_fused_path_cannot_compute_keep_their_forward(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, fused_calls: list[int]
) -> None:
    # LoRA dropout draws random masks the fused path does not: the layers keep the modules'.
    cfg = tiny_cfg("lora.lora_dropout=0.1")
    model, codec = _model(cfg, tiny_causal_dir)
    assert fused_decoders(model) == len(unwrap(model).model.layers)
    _train_step(model, codec, cfg, None)
    assert not fused_calls
    # Trainable base weights (as in full fine-tuning) are not the fused path's to differentiate.
    model, _ = _model(tiny_cfg(), tiny_causal_dir)
    unwrap(model).model.layers[0].mlp.down_proj.base_layer.weight.requires_grad_(True)
    assert fused_decoders(model) == len(unwrap(model).model.layers) - 1
    # A disabled adapter is PEFT's business.
    model, codec = _model(tiny_cfg(), tiny_causal_dir)
    fused_decoders(model)
    model.train()
    batch = codec.training_batch([codec.encode(e) for e in EXAMPLES])
    with model.disable_adapter():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    assert not fused_calls


def test_placement_fuses_decoder_layers_unless_told_not_to(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    for on in (True, False):
        cfg = tiny_cfg(f"speed.fused_decoder={str(on).lower()}")
        model, _ = _model(cfg, tiny_causal_dir)
        placed = Placement.from_config(cfg.train, cfg.speed).place(model)
        layer = unwrap(placed).model.layers[0]
        assert hasattr(layer, "_finlora_plain_forward") is on


def test_fused_layers_give_the_input_its_gradient_when_it_asks_for_one(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, fused_calls: list[int]
) -> None:
    """The first layer skips its input's gradient only when nothing needs it (frozen
    embeddings); embeddings that do need it (e.g. trained ones) get the modules' gradient."""
    cfg = tiny_cfg()
    codec = None
    grads = []
    for fuse in (False, True):
        model, codec = _model(cfg, tiny_causal_dir)
        if fuse:
            fused_decoders(model)
        model.train()
        batch = codec.training_batch([codec.encode(e) for e in EXAMPLES])
        embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False)
        out.logits[:, -1].float().pow(2).mean().backward()
        grads.append(embeds.grad)
    assert fused_calls
    plain_grad, fused_grad = grads
    assert plain_grad is not None and fused_grad is not None and plain_grad.abs().sum() > 0
    # fp32 rounding of a 20k-element gradient: compared as a whole, not element by element.
    assert float((fused_grad - plain_grad).norm() / plain_grad.norm()) < 1e-4
