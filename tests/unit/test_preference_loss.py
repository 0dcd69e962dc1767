"""The preference losses of finlora's training loop equal TRL's own code on the same batch.

Each test encodes preference records with finlora's codec, lets the tiny Llama (LoRA with non-zero
B) score them, and computes the batch loss through `PreferenceObjective.accumulate`, the call the
training loop makes. TRL 1.16 gets the same model's per-token log-probabilities of the same
answer tokens (its `outputs.log_probs`, with the completion mask of the same rows) and the same
reference log-probabilities, and computes its loss with its own code: `DPOTrainer._compute_loss`
and `KTOTrainer._compute_loss` (on a stand-in for the trainer: they need no more than its
settings), `ORPOTrainer.get_batch_logps` and `odds_ratio_loss`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer
from trl import DPOTrainer, KTOTrainer
from trl.experimental.orpo import ORPOTrainer

from finlora.config import RunConfig
from finlora.data.preference import PreferenceRecord, parse_preference
from finlora.methods import build_method
from finlora.models import Placement, load_base_model
from finlora.prompts import InstructTemplate
from finlora.tasks.classify import Batch
from finlora.tasks.instruct import InstructCodec
from finlora.tasks.preference import PreferenceCodec, PreferenceFeature
from finlora.training.preference import PreferenceObjective
from finlora.training.preference_loss import dpo_losses

CPU = torch.device("cpu")
PLACEMENT = Placement(CPU, None, "")
PAIRS = [
    ("Should I buy Nordvik shares now?", "Nobody can say; consider your horizon.", "Yes, buy now."),
    ("Compute the current ratio.", "5.0 / 4.0 = 1.25.", "It is 0.8."),
    ("What was the operating profit?", "The text does not give it.", "EUR 12.5 mn."),
    ("Is gold a safe place for my savings?", "No investment is entirely safe.", "Yes, always."),
]


@pytest.fixture(scope="module")
def codec(tiny_tokenizer_dir: Path) -> PreferenceCodec:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    return PreferenceCodec(InstructCodec(tokenizer, InstructTemplate.load("alpaca"), 256))


def pair_records() -> list[PreferenceRecord]:
    return [
        parse_preference(f"t:{i}", {"prompt": p, "chosen": c, "rejected": r})
        for i, (p, c, r) in enumerate(PAIRS)
    ]


def kto_records() -> list[PreferenceRecord]:
    rows = [(p, c, True) for p, c, _ in PAIRS[:3]] + [(p, r, False) for p, _, r in PAIRS[1:]]
    return [
        parse_preference(f"k:{i}", {"prompt": p, "completion": a, "label": d})
        for i, (p, a, d) in enumerate(rows)
    ]


@pytest.fixture
def model(tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path) -> Any:
    """The tiny Llama with LoRA whose B matrices are non-zero, so the adapter matters."""
    base = load_base_model(str(tiny_causal_dir), attention="eager")
    torch.manual_seed(0)
    lora = build_method(base.model, tiny_cfg("task=preference"), base.kind)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(lora.named_parameters()):
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=generator)
    return lora


def references(features: list[PreferenceFeature], seed: int = 2) -> list[PreferenceFeature]:
    """Features with made-up reference log-probabilities (the policy's, shifted at random)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for f in features:
        shift = torch.randn(len(f.answers) + 1, generator=generator).tolist()
        reference = tuple(-3.0 * len(a) + s for a, s in zip(f.answers, shift, strict=False))
        out.append(PreferenceFeature(f.prompt, f.answers, f.desirable, reference, f.mismatched,
                                     -2.0 * len(f.mismatched) + shift[-1]))  # fmt: skip
    return out


def token_logps(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's view of a batch: each next token's log-probability under the model, zero outside
    the answers (`outputs.log_probs`, (R, T-1)), and the answers' completion mask (R, T)."""
    completion = torch.zeros_like(batch.input_ids)
    for row in range(batch.input_ids.size(0)):
        real = batch.positions[row] >= 0
        completion[row, batch.positions[row][real] + 1] = 1
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None])
    return logp[..., 0] * completion[:, 1:], completion


def trainer_stub(**settings: Any) -> SimpleNamespace:
    """What TRL's `_compute_loss` reads of its trainer, besides the settings given."""
    gather = SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x, gather=lambda x: x)
    return SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=gather, aux_loss_enabled=False,
        precompute_ref_logps=True, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1, **settings,
    )  # fmt: skip


def outputs(log_probs: torch.Tensor) -> SimpleNamespace:
    zeros = torch.zeros_like(log_probs)
    return SimpleNamespace(
        log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
    )


def ours(
    tiny_cfg: Callable[..., RunConfig],
    model: Any,
    codec: PreferenceCodec,
    features: list[PreferenceFeature],
    records: list[PreferenceRecord],
    *settings: str,
) -> float:
    """The batch loss of finlora's training step."""
    cfg = tiny_cfg("task=preference", "data.template=alpaca", *settings)
    objective = PreferenceObjective(cfg, codec, SimpleNamespace(examples=records))
    loss, _ = objective.accumulate(model, codec, features, cfg, PLACEMENT)
    return loss


DPO_CASES = [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.0),
    ("hinge", 0.1, 0.0),
    ("ipo", 0.1, 0.0),
    ("robust", 0.1, 0.2),
]


@pytest.mark.parametrize(("loss_type", "beta", "smoothing"), DPO_CASES)
def test_dpo_loss_equals_trl(
    tiny_cfg: Callable[..., RunConfig],
    model: Any,
    codec: PreferenceCodec,
    loss_type: str,
    beta: float,
    smoothing: float,
) -> None:
    records = pair_records()
    features = references([f for f in (codec.encode(r) for r in records) if f is not None])
    assert len(features) == len(PAIRS) and all(f.paired for f in features)
    settings = [f"preference.loss_type={loss_type}", f"preference.beta={beta}",
                f"preference.label_smoothing={smoothing}"]  # fmt: skip
    loss = ours(tiny_cfg, model, codec, features, records, *settings)
    # TRL's batch: every chosen row, then every rejected row.
    rows = [f.rows()[0] for f in features] + [f.rows()[1] for f in features]
    batch = codec.rows_batch(rows)
    log_probs, completion = token_logps(model, batch)
    ref = torch.tensor([f.reference for f in features])  # (N, 2)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": completion, "ref_chosen_logps": ref[:, 0],
              "ref_rejected_logps": ref[:, 1]}  # fmt: skip
    stub = trainer_stub(
        ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=smoothing, use_weighting=False,
    )  # fmt: skip
    trl_loss = DPOTrainer._compute_loss(stub, lambda **_: outputs(log_probs), inputs, False)
    assert loss == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)
    assert stub._metrics["train"]["rewards/accuracies"]  # TRL's own path ran to its end


def test_conservative_dpo_is_the_smoothed_sigmoid() -> None:
    """TRL 1.16's sigmoid has no label smoothing; with it, finlora's is conservative DPO."""
    from finlora.config.preference import PreferenceSection

    c, r = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -5.0])
    rc, rr = torch.tensor([-5.0, -8.0]), torch.tensor([-5.5, -6.0])
    section = PreferenceSection(beta=0.5, label_smoothing=0.25)
    delta = (c - rc) - (r - rr)  # 1.5, -2.0
    expected = -0.75 * F.logsigmoid(0.5 * delta) - 0.25 * F.logsigmoid(-0.5 * delta)
    got = dpo_losses(c, r, rc, rr, section, (torch.ones(2), torch.ones(2)))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_equals_trl(
    tiny_cfg: Callable[..., RunConfig], model: Any, codec: PreferenceCodec, beta: float
) -> None:
    records = pair_records()
    features = [f for f in (codec.encode(r) for r in records) if f is not None]
    loss = ours(tiny_cfg, model, codec, features, records, "preference.objective=orpo",
                f"preference.beta={beta}")  # fmt: skip
    rows = [f.rows()[0] for f in features] + [f.rows()[1] for f in features]
    batch = codec.rows_batch(rows)
    _, completion = token_logps(model, batch)
    labels = batch.input_ids.masked_fill(completion == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mean_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(features)
    stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=CPU))
    odds = ORPOTrainer.odds_ratio_loss(stub, mean_logps[:n], mean_logps[n:])[0]
    # ORPO's cross-entropy of the chosen answers, on their answer tokens (finlora trains no
    # prompt token; TRL's experimental trainer also counts the chosen prompt's).
    nll = F.cross_entropy(logits[:n, :-1].flatten(0, 1), labels[:n, 1:].flatten())
    assert loss == pytest.approx(float(nll - odds.mean()), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("weights", "kl_shift"), [((1.0, 1.0), 0.5), ((1.33, 0.75), -50.0)])
def test_kto_loss_equals_trl(
    tiny_cfg: Callable[..., RunConfig],
    model: Any,
    codec: PreferenceCodec,
    weights: tuple[float, float],
    kl_shift: float,
) -> None:
    """Unpaired records, each with the previous record's answer as its mismatched one for the
    KL estimate (clamped at 0 in the second case)."""
    records = kto_records()
    encoded = [f for f in (codec.encode(r) for r in records) if f is not None]
    mismatched = [
        PreferenceFeature(
            f.prompt, f.answers, f.desirable, mismatched=codec.mismatched(f, encoded[i - 1])
        )  # fmt: skip
        for i, f in enumerate(encoded)
    ]
    features = references(mismatched)
    kl_rows = codec.rows_batch([(f.prompt, f.mismatched) for f in features])
    kl_log_probs, kl_completion = token_logps(model, kl_rows)
    policy_kl = kl_log_probs.sum(-1)
    features = [
        PreferenceFeature(
            f.prompt, f.answers, f.desirable, f.reference, f.mismatched, float(p) - kl_shift
        )  # fmt: skip
        for f, p in zip(features, policy_kl, strict=True)
    ]
    loss = ours(tiny_cfg, model, codec, features, records, "preference.objective=kto",
                f"preference.desirable_weight={weights[0]}",
                f"preference.undesirable_weight={weights[1]}")  # fmt: skip
    batch = codec.training_batch(features)
    log_probs, completion = token_logps(model, batch)
    inputs = {
        "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
        "completion_mask": completion, "label": torch.tensor([f.desirable[0] for f in features]),
        "KL_input_ids": kl_rows.input_ids, "KL_attention_mask": kl_rows.attention_mask,
        "KL_completion_mask": kl_completion,
        "ref_logps": torch.tensor([f.reference[0] for f in features]),
        "ref_KL_logps": torch.tensor([f.mismatched_reference for f in features]),
    }  # fmt: skip

    def trl_model(input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        return outputs(kl_log_probs if input_ids is kl_rows.input_ids else log_probs)

    stub = trainer_stub(calculate_KL=True, loss_type="kto", beta=0.1,
                        desirable_weight=weights[0], undesirable_weight=weights[1])  # fmt: skip
    stub._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(stub, m, b)
    trl_loss = KTOTrainer._compute_loss(stub, trl_model, inputs, False)
    assert stub._metrics["train"]["kl"] == [pytest.approx(max(kl_shift, 0.0), abs=1e-4)]
    assert loss == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)


def test_micro_batches_give_the_whole_batch_loss_and_gradient(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, codec: PreferenceCodec
) -> None:
    records = pair_records()
    features = references([f for f in (codec.encode(r) for r in records) if f is not None])
    budget = max(codec.width(f) for f in features) + 8
    results = []
    for objective in ("dpo", "orpo"):
        for setting in ("null", str(budget)):
            cfg = tiny_cfg("task=preference", f"preference.objective={objective}",
                           f"speed.max_batch_tokens={setting}")  # fmt: skip
            base = load_base_model(str(tiny_causal_dir), attention="eager")
            torch.manual_seed(0)
            lora = build_method(base.model, cfg, base.kind)
            target = PreferenceObjective(cfg, codec, SimpleNamespace(examples=records))
            loss, real = target.accumulate(lora, codec, features, cfg, PLACEMENT)
            grads = [p.grad.clone() for p in lora.parameters() if p.requires_grad]
            results.append((loss, real, grads))
    for (whole, whole_real, g1), (micro, micro_real, g2) in (results[:2], results[2:]):
        assert whole_real == micro_real
        assert micro == pytest.approx(whole, abs=1e-5)
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
