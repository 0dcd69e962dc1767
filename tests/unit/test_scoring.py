"""Scoring: the fast label-position path equals the plain full-logits path, the single-token
shortcut equals the general multi-token computation, and LoRA at init is the base model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finlora.config import RunConfig
from finlora.data import FPB_LABELS, synthetic_sentiment
from finlora.errors import FinloraError
from finlora.methods import build_method
from finlora.models import BaseModel, load_base_model
from finlora.prompts import PromptTemplate
from finlora.scoring import label_loglik, loss_fn, predict_proba
from finlora.tasks.classify import LabelCodec

# Verbalised with a leading space: several tokens each with the tiny tokenizer, of unequal length.
MULTI_TOKEN_LABELS = ["bearish outlook", "bullish outlook", "flat"]
TEXTS = [e.text for e in synthetic_sentiment(7, seed=3)]


def adapted(cfg: RunConfig, directory: Path, attention: str | None = None) -> tuple[BaseModel, Any]:
    """The tiny model with LoRA whose B matrices are made nonzero, in eval mode."""
    base = load_base_model(str(directory), attention=attention)
    model = build_method(base.model, cfg, base.kind)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return base, model.eval()


def codec_for(base: BaseModel, labels: list[str]) -> LabelCodec:
    return LabelCodec(base.tokenizer, PromptTemplate.load("sentiment"), labels, base.kind, 128)


def manual_loglik(model: Any, codec: LabelCodec, prompts: list[list[int]]) -> torch.Tensor:
    """Sum of per-token label log-probs, one unpadded (prompt, label) sequence at a time. (N, K)"""
    out = torch.zeros(len(prompts), len(codec.labels), dtype=torch.float64)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for k, label_ids in enumerate(codec.label_ids):
                if codec.kind == "causal":
                    logits = model(input_ids=torch.tensor([prompt + label_ids])).logits[0]
                    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(label_ids)]
                else:
                    rows = model(
                        input_ids=torch.tensor([prompt]), labels=torch.tensor([label_ids])
                    ).logits[0]
                logp = F.log_softmax(rows.double(), dim=-1)  # (L, V)
                out[i, k] = logp[torch.arange(len(label_ids)), torch.tensor(label_ids)].sum()
    return out


@pytest.fixture
def causal(tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path) -> tuple[BaseModel, Any]:
    return adapted(tiny_cfg(), tiny_causal_dir)


@pytest.fixture
def seq2seq(tiny_cfg: Callable[..., RunConfig], tiny_seq2seq_dir: Path) -> tuple[BaseModel, Any]:
    return adapted(tiny_cfg(model=tiny_seq2seq_dir), tiny_seq2seq_dir)


def test_labels_tokenize_as_intended(causal: tuple[BaseModel, Any]) -> None:
    base, _ = causal
    assert codec_for(base, list(FPB_LABELS)).single_token_labels
    multi = codec_for(base, MULTI_TOKEN_LABELS)
    assert not multi.single_token_labels
    lengths = [len(ids) for ids in multi.label_ids]
    assert min(lengths) >= 2 and len(set(lengths)) > 1


def test_a_label_that_starts_with_another_is_refused(causal: tuple[BaseModel, Any]) -> None:
    """'up strongly' scores 'up' plus a log-probability <= 0: it could never be predicted."""
    base, _ = causal
    with pytest.raises(FinloraError, match="label 'up strongly' starts with the tokens of label"):
        codec_for(base, ["down", "up", "up strongly"])


@pytest.mark.parametrize("labels", [list(FPB_LABELS), MULTI_TOKEN_LABELS])
def test_loss_fast_equals_plain(causal: tuple[BaseModel, Any], labels: list[str]) -> None:
    base, model = causal
    codec = codec_for(base, labels)
    features = [codec.encode_text(t) for t in TEXTS]
    batch = codec.collate([(p, codec.label_ids[i % 3]) for i, p in enumerate(features)])
    with torch.no_grad():
        fast = loss_fn(model, batch, "causal", fast=True)
        plain = loss_fn(model, batch, "causal", fast=False)
    assert torch.isfinite(fast)
    assert abs(fast.item() - plain.item()) < 1e-5


@pytest.mark.parametrize("labels", [list(FPB_LABELS), MULTI_TOKEN_LABELS])
def test_loss_is_mean_label_token_cross_entropy(
    causal: tuple[BaseModel, Any], labels: list[str]
) -> None:
    base, model = causal
    codec = codec_for(base, labels)
    prompts = [codec.encode_text(t) for t in TEXTS]
    gold = [i % 3 for i in range(len(prompts))]
    batch = codec.collate([(p, codec.label_ids[g]) for p, g in zip(prompts, gold, strict=True)])
    with torch.no_grad():
        loss = loss_fn(model, batch, "causal").item()
    manual = manual_loglik(model, codec, prompts)
    tokens = sum(len(codec.label_ids[g]) for g in gold)
    expected = -sum(manual[i, g].item() for i, g in enumerate(gold)) / tokens
    assert loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("labels", [list(FPB_LABELS), MULTI_TOKEN_LABELS])
def test_label_loglik_fast_plain_and_manual_agree(
    causal: tuple[BaseModel, Any], labels: list[str]
) -> None:
    base, model = causal
    codec = codec_for(base, labels)
    prompts = [codec.encode_text(t) for t in TEXTS]
    fast = label_loglik(model, codec, prompts, fast=True)
    plain = label_loglik(model, codec, prompts, fast=False)
    manual = manual_loglik(model, codec, prompts)
    assert fast.shape == (len(TEXTS), 3)
    # Log-likelihoods of multi-token labels reach ~100: compare relative to fp32 precision.
    # (Fast multi-token scoring reads each prompt once, from its cached keys and values.)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fast.double(), manual, atol=1e-5, rtol=1e-6)
    with model.disable_adapter():
        without = label_loglik(model, codec, prompts)
    assert (fast - without).abs().max() > 1e-2  # the perturbed adapter matters


@pytest.mark.parametrize("labels", [list(FPB_LABELS), MULTI_TOKEN_LABELS])
def test_unnormalized_scores_give_the_same_label_probabilities(
    causal: tuple[BaseModel, Any], labels: list[str]
) -> None:
    base, model = causal
    codec = codec_for(base, labels)
    prompts = [codec.encode_text(t) for t in TEXTS]
    full = label_loglik(model, codec, prompts)
    bare = label_loglik(model, codec, prompts, normalized=False)
    torch.testing.assert_close(bare.softmax(-1), full.softmax(-1), atol=1e-6, rtol=1e-5)
    if codec.single_token_labels:  # label logits alone: each row off by its log-normalizer
        offsets = (bare - full).double()
        assert offsets.std(dim=1).max() < 1e-5 and offsets.abs().min() > 1e-3
    expected = full.softmax(-1).double().numpy()
    proba = predict_proba(model, codec, TEXTS, progress=False)
    np.testing.assert_allclose(proba, expected, atol=1e-6)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_prompt_scoring_equals_one_row_per_label(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, attention: str
) -> None:
    # Prompts of unequal length (right-padded in the cache) and labels of unequal length.
    base, model = adapted(tiny_cfg(), tiny_causal_dir, attention)
    codec = codec_for(base, MULTI_TOKEN_LABELS)
    prompts = [codec.encode_text(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) > 1
    shared = label_loglik(model, codec, prompts, shared_prompt=True)
    rows = label_loglik(model, codec, prompts, shared_prompt=False)
    torch.testing.assert_close(shared, rows, atol=1e-5, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_sliding_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A 2-layer Mistral whose attention window (4) is shorter than every prompt."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=4, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_shared_prompt_scoring_with_a_sliding_window(
    tiny_cfg: Callable[..., RunConfig], tiny_sliding_dir: Path
) -> None:
    base, model = adapted(tiny_cfg(model=tiny_sliding_dir), tiny_sliding_dir, "eager")
    codec = codec_for(base, MULTI_TOKEN_LABELS)
    prompts = [codec.encode_text(t) for t in TEXTS]
    assert min(len(p) for p in prompts) > 4
    shared = label_loglik(model, codec, prompts, shared_prompt=True)
    rows = label_loglik(model, codec, prompts, shared_prompt=False)
    manual = manual_loglik(model, codec, prompts).float()
    torch.testing.assert_close(rows, manual, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(shared, rows, atol=1e-5, rtol=1e-6)


def test_single_token_shortcut_equals_general_path(causal: tuple[BaseModel, Any]) -> None:
    # The same labels scored through the general (prompt, label) batch the multi-token path uses.
    base, model = causal
    codec = codec_for(base, list(FPB_LABELS))
    prompts = [codec.encode_text(t) for t in TEXTS]
    shortcut = label_loglik(model, codec, prompts)
    batch = codec.collate([(p, ids) for p in prompts for ids in codec.label_ids])
    from finlora.scoring import label_logits, sequence_logprob

    with torch.no_grad():
        general = sequence_logprob(label_logits(model, batch, "causal"), batch.targets)
    torch.testing.assert_close(shortcut, general.view(len(prompts), 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("labels", [list(FPB_LABELS), MULTI_TOKEN_LABELS])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("trim", [True, False])
def test_predict_proba_rows_sum_to_one(
    causal: tuple[BaseModel, Any], labels: list[str], fast: bool, trim: bool
) -> None:
    base, model = causal
    codec = codec_for(base, labels)
    probs = predict_proba(
        model, codec, TEXTS, batch_size=3, fast=fast, trim_padding=trim, progress=False
    )
    assert probs.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert (probs > 0).all()
    # Batching (sorted by length, cut to trim padding or not, padded) does not change a text's
    # scores.
    one_by_one = np.vstack(
        [predict_proba(model, codec, [t], fast=fast, progress=False) for t in TEXTS]
    )
    np.testing.assert_allclose(probs, one_by_one, atol=1e-5)


def test_seq2seq_loss_and_scores(seq2seq: tuple[BaseModel, Any]) -> None:
    base, model = seq2seq
    assert base.kind == "seq2seq"
    codec = codec_for(base, list(FPB_LABELS))
    assert not codec.single_token_labels  # T5 targets end with </s>
    prompts = [codec.encode_text(t) for t in TEXTS]
    batch = codec.collate([(p, codec.label_ids[i % 3]) for i, p in enumerate(prompts)])
    with torch.no_grad():
        loss = loss_fn(model, batch, "seq2seq")
        assert loss.item() == pytest.approx(loss_fn(model, batch, "seq2seq", fast=False).item())
    assert torch.isfinite(loss) and loss.item() > 0
    scores = label_loglik(model, codec, prompts)  # one encoder pass a prompt
    assert torch.isfinite(scores).all()
    # fp32 scores against a float64 sum: scores near -10 differ by ~1e-5 in the last bits.
    torch.testing.assert_close(
        scores.double(), manual_loglik(model, codec, prompts), atol=1e-5, rtol=1e-6
    )
    rows = label_loglik(model, codec, prompts, shared_prompt=False)  # one row a label
    torch.testing.assert_close(scores, rows, atol=1e-5, rtol=1e-6)
    probs = predict_proba(model, codec, TEXTS, batch_size=4, progress=False)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_lora_at_init_leaves_logits_unchanged(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    base = load_base_model(str(tiny_causal_dir))
    base.model.eval()
    ids = torch.tensor([base.tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        before = base.model(input_ids=ids).logits
    model = build_method(base.model, tiny_cfg(), "causal").eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("fixture", ["tiny_causal_dir", "tiny_seq2seq_dir", "tiny_encoder_dir"])
def test_texts_cut_to_max_length_are_counted(fixture: str, request: pytest.FixtureRequest) -> None:
    base = load_base_model(str(request.getfixturevalue(fixture)), labels=["up", "down"])
    codec = LabelCodec(base.tokenizer, PromptTemplate.load("sentiment"), ["up", "down"],
                       base.kind, 32)  # fmt: skip
    short, long = "Sales rose.", "Sales rose again and again " * 8
    whole = len(codec.encode_text(short))
    assert codec.overflow.count == 0  # a text that fits is not counted
    cut = codec.encode_text(long)
    assert codec.overflow.count == 1 and codec.overflow.longest > 32 >= len(cut)
    assert len(cut) > whole  # cut to fit, not dropped
    assert codec.overflow.note(1, 2, "text(s)", 32) is None  # none cut since the first
    note = codec.overflow.note(0, 2, "text(s)", 32)
    assert note is not None and note.startswith("1 of 2 text(s) longer than data.max_length=32")
    # A later, shorter cut text is described on its own: "longest" counts from `since` on.
    codec.encode_text(long[: len(long) // 2] + "and more")
    first, second = codec.overflow.lengths
    assert second < first
    assert f"(the longest has {second} tokens)" in str(codec.overflow.note(1, 1, "text(s)", 32))
