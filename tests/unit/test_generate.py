"""Generation from prompt-learning models (prefix, prompt, P-tuning) on a tiny Llama: greedy
answers, batched (left-padded) and streamed, equal an argmax loop over the PEFT model's own
forward pass without a cache, the pass that training and scoring use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import (
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)

from finlora.errors import FinloraError
from finlora.generate import GenerationOptions, generate_answers, stream_reply

PROMPTS = [[5, 17, 42, 99, 7, 3, 60], [8, 9, 10], [30, 31, 32, 33]]
NEW = 8

PEFT_CONFIGS: dict[str, Any] = {
    "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6),
    "ptuning": PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, encoder_hidden_size=32
    ),
    "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6),
    "lora": LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)


def _model(tokenizer: Any, method: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), PEFT_CONFIGS[method]).eval()
    # Trained-looking virtual tokens: large enough to change what the model says.
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.5)
    return model


@torch.no_grad()
def _reference(model: Any, tokenizer: Any, prompt: list[int]) -> list[int]:
    """The new token ids, up to and including an end token."""
    ids = torch.tensor([prompt])
    for _ in range(NEW):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (1, T, V)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
    new = ids[0, len(prompt) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    return new


def assert_answers(
    model: Any, tokenizer: Any, prompts: list[list[int]], new_ids: list[list[int]]
) -> list[str]:
    """finlora's greedy answers, batched and streamed, are those of the reference token ids;
    returns them."""
    expected = [tokenizer.decode(n, skip_special_tokens=True).strip() for n in new_ids]
    options = GenerationOptions(max_new_tokens=NEW)
    batched = generate_answers(model, tokenizer, prompts, options, batch_size=3, progress=False)
    assert batched == expected
    pieces: list[str] = []
    reply = stream_reply(model, tokenizer, prompts[0], options, pieces.append)
    assert reply.text == expected[0] == "".join(pieces).strip()
    assert reply.new_tokens == len(new_ids[0])
    assert reply.hit_limit == (tokenizer.eos_token_id not in new_ids[0])
    return expected


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_greedy_answers_equal_the_uncached_forward(tokenizer: Any, method: str) -> None:
    model = _model(tokenizer, method)
    assert_answers(model, tokenizer, PROMPTS, [_reference(model, tokenizer, p) for p in PROMPTS])


def _gpt2(tokenizer: Any, positions: int) -> Any:
    """A tiny GPT-2: learned position embeddings, so a position past the last is an error."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=positions, n_embd=32, n_layer=2, n_head=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def test_answers_stop_at_the_models_last_position(tokenizer: Any) -> None:
    model = _gpt2(tokenizer, positions=24)
    eos = tokenizer.eos_token_id
    prompt = [t for t in range(5, 60) if t != eos][:20]
    options = GenerationOptions(max_new_tokens=50)
    reply = stream_reply(model, tokenizer, prompt, options, lambda _: None)
    assert reply.new_tokens <= 4 and (reply.hit_limit or reply.new_tokens < 4)
    assert len(generate_answers(model, tokenizer, [prompt, prompt[:3]], options, progress=False))
    with pytest.raises(FinloraError, match="takes 24 of the 24 positions the model has"):
        stream_reply(model, tokenizer, prompt + prompt[:4], options, lambda _: None)


def test_a_vanishing_temperature_decodes_greedily(tokenizer: Any) -> None:
    model = _model(tokenizer, "lora")
    greedy = GenerationOptions(max_new_tokens=NEW)
    tiny = GenerationOptions(max_new_tokens=NEW, temperature=1e-300, seed=3)
    answers = [
        generate_answers(model, tokenizer, PROMPTS, o, progress=False) for o in (greedy, tiny)
    ]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("wanted", [0, -3, 4097, 10**9])
def test_answers_outside_1_to_4096_tokens_are_refused(wanted: int) -> None:
    """An encoder-decoder has no last position to stop at: a huge --max-new-tokens would run
    for as long as the model keeps from writing its end token."""
    with pytest.raises(FinloraError, match=f"between 1 and 4096 \\(got {wanted}\\)"):
        GenerationOptions(max_new_tokens=wanted)
    assert GenerationOptions(max_new_tokens=4096).max_new_tokens == 4096
