"""Instruction tuning of seq2seq models (T5, mT0, BART): the encoder reads the prompt and the
decoder learns the response. On a tiny T5: the batch and its loss against transformers' own,
and greedy answers (batched, right-padded; streamed) against an argmax loop over the uncached
forward pass; methods with virtual tokens refused, in one line, before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from test_generate import NEW, assert_answers

from finlora.data.instruct import alpaca_record
from finlora.generate import GenerationOptions, generate_answers
from finlora.prompts import InstructTemplate
from finlora.scoring import loss_fn
from finlora.tasks.classify import IGNORE
from finlora.tasks.instruct import InstructCodec

RECORDS = [
    alpaca_record("What is EBITDA?", "Earnings before interest, taxes and amortisation."),
    alpaca_record("Classify the sentiment.", "positive", "Profit rose to EUR 13.1 mn."),
    alpaca_record("Define liquidity.", "Cash at hand."),
]
PEFT_CONFIGS: dict[str, Any] = {
    "lora": LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, target_modules=["q", "v"]),
    "ia3": IA3Config(
        task_type=TaskType.SEQ_2_SEQ_LM, target_modules=["k", "v", "wo"], feedforward_modules=["wo"]
    ),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_seq2seq_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_seq2seq_dir, local_files_only=True)


@pytest.fixture(scope="module")
def codec(tokenizer: Any) -> InstructCodec:
    return InstructCodec(tokenizer, InstructTemplate.load("alpaca"), 512, kind="seq2seq")


def _model(tiny_seq2seq_dir: Path, method: str) -> Any:
    from transformers import T5ForConditionalGeneration

    base = T5ForConditionalGeneration.from_pretrained(tiny_seq2seq_dir)
    torch.manual_seed(0)
    model = get_peft_model(base, PEFT_CONFIGS[method]).eval()
    # Trained-looking adapter weights: large enough to change what the model says.
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.5)
    return model


def test_prompt_goes_to_the_encoder_and_the_response_to_the_decoder(
    codec: InstructCodec, tokenizer: Any, tiny_seq2seq_dir: Path
) -> None:
    features = [codec.encode(r) for r in RECORDS]
    assert all(f is not None for f in features)
    batch = codec.training_batch(features)  # type: ignore[arg-type]
    for row, (record, feature) in enumerate(zip(RECORDS, features, strict=True)):
        assert feature is not None
        prompt = codec.generation_prompt(record)
        answer = tokenizer(record.response, add_special_tokens=False)["input_ids"]
        assert feature.ids == prompt + answer + [tokenizer.eos_token_id]
        assert batch.input_ids[row, : len(prompt)].tolist() == prompt
        assert batch.attention_mask[row].sum() == len(prompt)
        targets = batch.targets[row][batch.targets[row] != IGNORE].tolist()
        assert targets == answer + [tokenizer.eos_token_id]
    # The loss is transformers' own sequence-to-sequence loss with these labels.
    model = _model(tiny_seq2seq_dir, "lora")
    with torch.no_grad():
        ours = loss_fn(model, batch, "seq2seq")
        theirs = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.targets
        ).loss
    torch.testing.assert_close(ours, theirs)


@torch.no_grad()
def _reference(model: Any, tokenizer: Any, prompt: list[int]) -> list[int]:
    """The new token ids, up to and including an end token, decoded one step at a time."""
    ids = torch.tensor([prompt])
    start = model.get_base_model().config.decoder_start_token_id
    decoded = torch.tensor([[start]])
    for _ in range(NEW):
        logits = model(input_ids=ids, decoder_input_ids=decoded).logits  # (1, T, V)
        decoded = torch.cat([decoded, logits[:, -1:].argmax(-1)], 1)
    new = decoded[0, 1:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    return new


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_greedy_answers_equal_the_uncached_forward(
    codec: InstructCodec, tokenizer: Any, tiny_seq2seq_dir: Path, method: str
) -> None:
    model = _model(tiny_seq2seq_dir, method)
    prompts = [codec.generation_prompt(r) for r in RECORDS]
    assert len({len(p) for p in prompts}) == len(prompts)  # the batch needs padding
    new_ids = [_reference(model, tokenizer, p) for p in prompts]
    assert any(assert_answers(model, tokenizer, prompts, new_ids))  # not all empty


def test_virtual_token_methods_are_refused(
    tiny_overrides: list[str], tiny_seq2seq_dir: Path, tmp_path: Path, tokenizer: Any
) -> None:
    from finlora.config import load_config
    from finlora.errors import FinloraError
    from finlora.train import train

    data = tmp_path / "records.jsonl"
    data.write_text('{"instruction": "Define EBITDA.", "output": "Earnings."}\n' * 10)
    shared = [o for o in tiny_overrides if not o.startswith("lora.")]
    chosen = [f"model.name={tiny_seq2seq_dir}", f"data.path={data}", "task=instruct"]
    cfg = load_config(None, [*shared, *chosen, "data.template=alpaca", "method.name=prompt"])
    with pytest.raises(FinloraError, match="^methods prefix, prompt and ptuning cannot be used"):
        train(cfg, tmp_path / "run", progress_bar=False, log=lambda _m: None)
    assert not (tmp_path / "run").exists()
    # Generation refuses such a model too, rather than answer without its decoder's tokens.
    from transformers import T5ForConditionalGeneration

    base = T5ForConditionalGeneration.from_pretrained(tiny_seq2seq_dir)
    config = PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=4)
    model = get_peft_model(base, config)
    with pytest.raises(FinloraError, match="^methods prefix, prompt and ptuning"):
        generate_answers(model, tokenizer, [[5, 6, 7]], GenerationOptions(4), progress=False)
