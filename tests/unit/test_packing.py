"""Sequence packing (`train.packing`): records packed best fit longest first into sequences no
longer than data.max_length, each record attending only to itself, so a packed batch has the
unpacked loss, logits and gradients, through every path (answer-only logits or not, eager or
SDPA attention, fused decoder layers, micro-batches); a run trains packed, and packing is
refused where it cannot apply."""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from finlora.config import RunConfig, load_config
from finlora.data.instruct import InstructRecord, Message, alpaca_record
from finlora.errors import FinloraError
from finlora.methods import build_method
from finlora.models import Placement, load_base_model
from finlora.models.fast.segments import Segments
from finlora.prompts import InstructTemplate
from finlora.runs import RunDir
from finlora.scoring import loss_fn
from finlora.tasks.instruct import InstructCodec, InstructFeature
from finlora.train import accumulate_batch, train
from finlora.training.packing import pack

CPU = torch.device("cpu")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
RECORDS = [
    alpaca_record("What is EBITDA?", "Earnings before interest, taxes and amortisation."),
    alpaca_record("Compute the P/E ratio.", "42 / 3.5 = 12.", "Price EUR 42, EPS EUR 3.5."),
    alpaca_record("Sentiment?", "Negative.", "Sales fell 9 % in the quarter."),
    alpaca_record("Define free cash flow.", "Operating cash flow minus capital expenditure."),
    alpaca_record("Is a rising order book good news?", "Usually, yes: it signals future sales."),
    alpaca_record("Name a liquidity ratio.", "The current ratio."),
    alpaca_record("What does a profit warning say?", "That profit will miss the forecast."),
]


# A short prompt: the tiny tokenizer spells Alpaca's header in ~100 tokens, and the tiny Llama
# has 256 positions, so records this size let several share a sequence.
SHORT_TEMPLATE = {
    "prompt_input": "Q: {instruction}\n{input}\nA: ",
    "prompt_no_input": "Q: {instruction}\nA: ",
}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "short.json"
    path.write_text(json.dumps(SHORT_TEMPLATE), encoding="utf-8")
    return path


def _feature(length: int) -> InstructFeature:
    return InstructFeature(list(range(100, 100 + length)), (length - 1,))


# ---- what goes where ---------------------------------------------------------------------------


def test_best_fit_decreasing_bins() -> None:
    lengths = [7, 5, 4, 3, 2, 6]
    packed = pack([_feature(n) for n in lengths], max_length=10)
    # 7, 6, 5 open a sequence each; 4 fills the 6's (room 4), 3 the 7's (room 3), 2 goes with
    # the 5 (room 5), the only sequence left with room.
    assert [[len(range(*span)) for span in _spans(f)] for f in packed] == [[7, 3], [6, 4], [5, 2]]
    assert [f.starts for f in packed] == [(0, 7), (0, 6), (0, 5)]
    assert [f.targets for f in packed] == [(6, 9), (5, 9), (4, 6)]
    assert [f.position_ids for f in packed][2] == [0, 1, 2, 3, 4, 0, 1]


def _spans(feature: InstructFeature) -> list[tuple[int, int]]:
    ends = (*feature.starts[1:], len(feature.ids))
    return list(zip(feature.starts, ends, strict=True))


def test_packing_keeps_every_record_whole_and_within_max_length(
    tokenizer: Any, template: Path
) -> None:
    codec = _codec(tokenizer, template, max_length=64)
    features = [codec.encode(r) for r in RECORDS * 3]
    assert all(f is not None for f in features)
    packed = pack(features, 64)
    assert len(packed) < len(features)
    assert all(len(f.ids) <= 64 for f in packed)
    pieces = sorted(
        (f.ids[a:b], tuple(t - a for t in f.targets if a <= t < b))
        for f in packed
        for a, b in _spans(f)
    )
    assert pieces == sorted((f.ids, f.targets) for f in features)


def test_a_record_of_max_length_fills_a_sequence_alone() -> None:
    packed = pack([_feature(10), _feature(3), _feature(9)], max_length=10)
    assert [len(f.starts) for f in packed] == [1, 1, 1]
    assert sorted(len(f.ids) for f in packed) == [3, 9, 10]


# ---- the same numbers as unpacked --------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)


def _codec(tokenizer: Any, template: Path, max_length: int = 256) -> InstructCodec:
    return InstructCodec(tokenizer, InstructTemplate.load(str(template)), max_length)


def _lora_model(cfg: RunConfig, directory: Path, attention: str = "eager") -> Any:
    """The tiny Llama with LoRA whose B matrices are non-zero, so the adapter matters."""
    base = load_base_model(str(directory), attention=attention)
    torch.manual_seed(0)
    model = build_method(base.model, cfg, base.kind)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                seed = zlib.crc32(name.encode())
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model


def _packed(codec: InstructCodec) -> tuple[list[InstructFeature], list[InstructFeature]]:
    """The records' features, and the same packed into a few sequences of up to 128 tokens."""
    features = [f for f in (codec.encode(r) for r in RECORDS) if f is not None]
    assert len(features) == len(RECORDS)
    packed = pack(features, 128)
    assert len(packed) < len(features) and any(len(f.starts) > 2 for f in packed)
    return features, packed


@pytest.mark.parametrize(
    ("attention", "fast"), [("eager", True), ("eager", False), ("sdpa", True), ("sdpa", False)]
)
def test_packed_loss_is_the_unpacked_loss(
    tiny_cfg: Callable[..., RunConfig],
    tiny_causal_dir: Path,
    tokenizer: Any,
    template: Path,
    attention: str,
    fast: bool,
) -> None:
    model = _lora_model(tiny_cfg("task=instruct"), tiny_causal_dir, attention).eval()
    codec = _codec(tokenizer, template)
    features, packed = _packed(codec)
    with torch.no_grad():
        unpacked_loss = loss_fn(model, codec.training_batch(features), "causal", fast)
        packed_loss = loss_fn(model, codec.training_batch(packed), "causal", fast)
        # Each row alone (no padding, no packing): the token-weighted mean of their losses.
        alone = [
            (loss_fn(model, codec.training_batch([f]), "causal", fast), len(f.targets))
            for f in features
        ]
    reference = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(packed_loss, reference, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_each_packed_record_has_its_unpacked_logits(
    tiny_cfg: Callable[..., RunConfig],
    tiny_causal_dir: Path,
    tokenizer: Any,
    template: Path,
    attention: str,
) -> None:
    model = _lora_model(tiny_cfg("task=instruct"), tiny_causal_dir, attention).eval()
    codec = _codec(tokenizer, template)
    _, packed = _packed(codec)
    batch = codec.training_batch(packed)  # right-padded rows of several records each
    assert batch.position_ids is not None
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).logits  # (B, T, V)
        for row, feature in enumerate(packed):
            for a, b in _spans(feature):
                alone = model(input_ids=torch.tensor([feature.ids[a:b]])).logits[0]  # (t, V)
                torch.testing.assert_close(logits[row, a:b], alone, atol=1e-5, rtol=1e-5)
        # Without the position ids the records would read each other: the test can tell.
        mixed = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    a, b = _spans(packed[0])[1]
    assert not torch.allclose(mixed[0, a:b], logits[0, a:b], atol=1e-3)


@pytest.mark.parametrize(
    ("budget", "laid_out"), [("null", True), ("128", True), ("null", False), ("128", False)]
)
def test_packed_gradients_are_the_unpacked_ones_through_the_fused_layers(
    tiny_cfg: Callable[..., RunConfig],
    tiny_causal_dir: Path,
    tokenizer: Any,
    template: Path,
    monkeypatch: pytest.MonkeyPatch,
    budget: str,
    laid_out: bool,
) -> None:
    """Training mode with gradients: the fused decoder layers (eager attention) and, with a
    token budget, several micro-batches; their attention one record per row (`Segments`), or
    over the packed rows under the block-diagonal mask where that layout would cost more."""
    cfg = tiny_cfg("task=instruct", f"speed.max_batch_tokens={budget}")
    placement = Placement(CPU, None, "eager")
    codec = _codec(tokenizer, template)
    features, packed = _packed(codec)
    layouts: list[Segments | None] = []
    worth_it = Segments.worth_it

    def spied(position_ids: torch.Tensor | None) -> Segments | None:
        layouts.append(worth_it(position_ids) if laid_out else None)
        return layouts[-1]

    monkeypatch.setattr(Segments, "worth_it", staticmethod(spied))
    results = []
    for rows in (features, packed):
        model = placement.place(_lora_model(cfg, tiny_causal_dir)).train()
        loss, real = accumulate_batch(model, codec, rows, cfg, placement)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, real, grads))
    # The packed micro-batches took the records' layout (or, told not to, the mask).
    assert any(layouts) == laid_out
    (loss, real, grads), (packed_loss, packed_real, packed_grads) = results
    assert packed_real == real == sum(len(f.ids) for f in features)
    assert packed_loss == pytest.approx(loss, abs=1e-5)
    for name, grad in grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-4 * scale, rtol=0, msg=name)


def test_a_packed_row_with_one_record_and_padding_needs_no_position_ids(
    tokenizer: Any, template: Path
) -> None:
    codec = _codec(tokenizer, template)
    features = [codec.encode(r) for r in RECORDS[:3]]
    assert codec.training_batch([f for f in features if f is not None]).position_ids is None


# ---- a run -------------------------------------------------------------------------------------


def _instruct_file(tmp_path: Path) -> Path:
    path = tmp_path / "fin.jsonl"
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.response} for r in RECORDS]
    path.write_text("\n".join(json.dumps(r) for r in rows * 4) + "\n", encoding="utf-8")
    return path


def test_a_run_trains_on_packed_sequences(
    tiny_cfg: Callable[..., RunConfig], template: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(
        "task=instruct",
        f"data.path={_instruct_file(tmp_path)}",
        f"data.template={template}",
        "data.max_length=96",
        "train.packing=true",
        "train.batch_size=2",
        "train.max_steps=2",
    )
    lines: list[str] = []
    result = train(cfg, tmp_path / "run", progress_bar=False, log=lines.append)
    assert result.steps == 2
    note = next(line for line in lines if "packed into" in line)
    # 28 records, 17 of them in training, about 40 tokens each: two to a sequence, one alone.
    assert (
        note == "data: 17 train record(s) packed into 9 sequence(s) of at most 96 tokens (83% full)"
    )
    losses = [row["loss"] for row in RunDir(tmp_path / "run").read_metrics() if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((), "train.packing is for task instruct (this run is task classify)"),
        (("task=preference",), "train.packing is for task instruct (this run is task preference)"),
        (
            ("task=instruct", "method.name=prompt"),
            "train.packing does not work with method prompt: its virtual tokens",
        ),
    ],
)
def test_packing_is_refused_where_it_cannot_apply(overrides: tuple[str, ...], message: str) -> None:
    # Refused with the config, before any data or model is loaded.
    with pytest.raises(FinloraError, match=re.escape(f"config: {message}")):
        load_config(None, [*overrides, "train.packing=true"])


def test_packing_is_refused_for_a_seq2seq_model(
    tiny_cfg: Callable[..., RunConfig], tiny_seq2seq_dir: Path, template: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(
        "task=instruct",
        f"data.path={_instruct_file(tmp_path)}",
        f"data.template={template}",
        "train.packing=true",
        model=tiny_seq2seq_dir,
    )
    with pytest.raises(FinloraError, match="train.packing needs a causal language model"):
        train(cfg, tmp_path / "run", progress_bar=False, log=lambda _: None)


def test_a_chat_record_packs_with_its_assistant_turns_as_targets(
    tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    tok.chat_template = CHATML
    codec = InstructCodec(tok, InstructTemplate.load("chat"), 256)
    chat = InstructRecord(
        (
            Message("user", "What is EBIT?"),
            Message("assistant", "Operating profit."),
            Message("user", "And EBITDA?"),
            Message("assistant", "EBIT plus depreciation."),
        ),
        "chat.jsonl:1",
    )
    one, two = codec.encode(chat), codec.encode(RECORDS[0])
    assert one is not None and two is not None
    (packed,) = pack([one, two], 256)
    answers = tok.decode([packed.ids[t] for t in packed.targets])
    assert answers == (
        tok.decode([one.ids[t] for t in one.targets])
        + tok.decode([two.ids[t] for t in two.targets])
    )
    assert "Operating profit." in answers and "EBIT plus depreciation." in answers


def test_bench_train_times_packing_beside_the_unpacked_path(
    tiny_overrides: list[str], template: Path, tmp_path: Path
) -> None:
    from finlora.bench import bench_train, setup

    overrides = [
        *tiny_overrides,
        "task=instruct",
        f"data.path={_instruct_file(tmp_path)}",
        f"data.template={template}",
        "data.max_length=96",
    ]
    result = bench_train(None, overrides, n=6, rounds=1, variants=["train.packing=true"])
    packed = result["variants"]["train.packing=true"]
    # The same records, so the same real tokens: packed, unpacked and padded to max_length.
    assert packed["real_tokens"] == result["finlora"]["real_tokens"]
    assert result["classic"]["real_tokens"] == result["finlora"]["real_tokens"] > 0
    assert result["n_sentences"] == 6
    paths = setup(None, overrides, 6, ["train.packing=true"]).paths
    assert len(paths["finlora"].features) == 6 > len(paths["train.packing=true"].features)
