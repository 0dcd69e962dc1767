"""The instruction codec: answer tokens are the only targets, prompts are what generation sees,
truncation keeps targets in range, and the training loss is the causal LM loss on the answers
through every path (fast, plain, micro-batched)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from finlora.config import RunConfig
from finlora.data.instruct import InstructRecord, Message, alpaca_record
from finlora.errors import FinloraError
from finlora.methods import build_method
from finlora.models import Placement, load_base_model
from finlora.prompts import InstructTemplate
from finlora.scoring import loss_fn
from finlora.tasks.classify import IGNORE, token_budget_chunks
from finlora.tasks.instruct import InstructCodec
from finlora.train import accumulate_batch

CPU = torch.device("cpu")
# SmolLM2's ChatML template; the tiny tokenizer reads its markers as plain text.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EBITDA = alpaca_record("What is EBITDA?", "Earnings before interest, taxes and amortisation.")
PE = alpaca_record("Compute the P/E ratio.", "42 / 3.5 = 12.", "Price EUR 42, EPS EUR 3.5.")
TWO_EXCHANGES = InstructRecord(
    (
        Message("system", "Be brief."),
        Message("user", "What is EBIT?"),
        Message("assistant", "Operating profit."),
        Message("user", "And EBITDA?"),
        Message("assistant", "EBIT plus depreciation."),
    ),
    "chat.jsonl:3",
)
RECORDS = [
    EBITDA,
    PE,
    alpaca_record("Sentiment?", "Negative.", "Sales fell 9 % in the quarter.", label="negative"),
    alpaca_record("Define free cash flow.", "Operating cash flow minus capital expenditure."),
    alpaca_record("Is a rising order book good news?", "Usually, yes: it signals future sales."),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny tokenizer saved again with a ChatML chat template, as SmolLM2 has."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    tok.chat_template = CHATML
    directory = tmp_path_factory.mktemp("tiny-chat-tokenizer")
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer_dir: Path) -> Any:
    """The tiny tokenizer made to add a BOS, with a chat template that writes one too (as Llama 3,
    Mistral and Gemma do)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    raw.add_special_tokens(["<s>"])
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", pad_token="<pad>", eos_token="</s>"
    )
    tok.chat_template = "{{ bos_token }}" + CHATML
    assert tok("Hi")["input_ids"][0] == bos != tok("Hi", add_special_tokens=False)["input_ids"][0]
    return tok


def alpaca(tok: Any, max_length: int = 512) -> InstructCodec:
    return InstructCodec(tok, InstructTemplate.load("alpaca"), max_length)


def chat(tok: Any, max_length: int = 512) -> InstructCodec:
    return InstructCodec(tok, InstructTemplate.load("chat"), max_length)


def target_text(codec: InstructCodec, record: InstructRecord) -> str:
    feature = codec.encode(record)
    assert feature is not None
    return str(codec.tokenizer.decode([feature.ids[t] for t in feature.targets]))


def spans(targets: tuple[int, ...]) -> list[range]:
    """Runs of consecutive target indices."""
    runs: list[list[int]] = []
    for t in targets:
        if runs and runs[-1][-1] == t - 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    return [range(r[0], r[-1] + 1) for r in runs]


# ---- what is a target --------------------------------------------------------------------------


def test_alpaca_targets_are_the_answer_and_eos(tokenizer: Any) -> None:
    codec = alpaca(tokenizer)
    for record in (EBITDA, PE):
        assert target_text(codec, record) == record.response + "</s>"
        feature = codec.encode(record)
        assert feature is not None
        (run,) = spans(feature.targets)
        assert run.stop == len(feature.ids)  # the answer ends the sequence
        prompt = tokenizer.decode(feature.ids[: run.start])
        assert prompt == InstructTemplate.load("alpaca").prompt(record.instruction, record.input)
        assert prompt.endswith("### Response:\n")
    assert "### Input:\nPrice EUR 42, EPS EUR 3.5." in tokenizer.decode(codec.encode(PE).ids)


def test_chat_targets_are_the_answer_and_end_of_turn(chat_tokenizer: Any) -> None:
    codec = chat(chat_tokenizer)
    assert target_text(codec, EBITDA) == EBITDA.response + "<|im_end|>\n"
    feature = codec.encode(EBITDA)
    assert feature is not None
    (run,) = spans(feature.targets)
    assert chat_tokenizer.decode(feature.ids[: run.start]) == (
        "<|im_start|>user\nWhat is EBITDA?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_targets_every_assistant_turn(chat_tokenizer: Any) -> None:
    codec = chat(chat_tokenizer)
    feature = codec.encode(TWO_EXCHANGES)
    assert feature is not None
    first, second = spans(feature.targets)
    decode = chat_tokenizer.decode
    assert decode(feature.ids[first.start : first.stop]) == "Operating profit.<|im_end|>\n"
    assert decode(feature.ids[second.start : second.stop]) == "EBIT plus depreciation.<|im_end|>\n"
    # The system message and both user turns are prompt, never targets.
    between = decode(feature.ids[first.stop : second.start])
    assert between == "<|im_start|>user\nAnd EBITDA?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(feature.ids[: first.start]).startswith("<|im_start|>system\nBe brief.")
    # The whole sequence is the template's rendering of the conversation.
    rows = [{"role": m.role, "content": m.content} for m in TWO_EXCHANGES.messages]
    assert decode(feature.ids) == chat_tokenizer.apply_chat_template(rows, tokenize=False)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_generation_prompt_is_what_precedes_the_answer(
    tokenizer: Any, chat_tokenizer: Any, template: str
) -> None:
    codec = alpaca(tokenizer) if template == "alpaca" else chat(chat_tokenizer)
    records = [*RECORDS, TWO_EXCHANGES] if template == "chat" else RECORDS
    for record in records:
        feature = codec.encode(record)
        assert feature is not None
        last = spans(feature.targets)[-1]
        # The model answers from exactly the tokens it was trained to answer after.
        assert codec.generation_prompt(record) == feature.ids[: last.start], record.source


@pytest.mark.parametrize("field", ["input", "instruction", "instruction beside an input"])
def test_a_long_alpaca_prompt_loses_the_end_of_its_input(tokenizer: Any, field: str) -> None:
    """The template's header and its closing "### Response:" stay: only the long field is cut
    (the longer of input and instruction first)."""
    long_text = " ".join(f"Revenue in quarter {i} rose to EUR {i}.{i} mn." for i in range(60))
    record = {
        "input": alpaca_record("Summarise the report.", "Sales grew.", long_text),
        "instruction": alpaca_record(long_text, "Sales grew."),
        "instruction beside an input": alpaca_record(long_text, "Sales grew.", "EUR mn"),
    }[field]
    whole = alpaca(tokenizer, max_length=10_000).generation_prompt(record)
    codec = alpaca(tokenizer, max_length=len(whole) // 3)
    cut = codec.generation_prompt(record)
    assert len(whole) // 3 - 4 <= len(cut) <= len(whole) // 3  # fits, cutting little more
    text = tokenizer.decode(cut, skip_special_tokens=True)
    full = tokenizer.decode(whole, skip_special_tokens=True)
    assert text.startswith(full[:60]) and text.endswith(full[-15:])  # header and tail kept
    assert "Revenue in quarter 0 rose" in text and "quarter 59" not in text
    assert codec.overflow.lengths == [len(whole)]  # counted for the note


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_one_bos_in_training_and_generation(bos_tokenizer: Any, template: str) -> None:
    codec = alpaca(bos_tokenizer) if template == "alpaca" else chat(bos_tokenizer)
    feature = codec.encode(EBITDA)
    assert feature is not None
    bos = bos_tokenizer.bos_token_id
    assert feature.ids[0] == bos and feature.ids.count(bos) == 1, feature.ids[:4]
    assert codec.generation_prompt(EBITDA) == feature.ids[: feature.targets[0]]


def test_chat_prompt_renders_the_conversation_so_far(tokenizer: Any, chat_tokenizer: Any) -> None:
    history = list(TWO_EXCHANGES.prompt_messages)
    assert chat(chat_tokenizer).chat_prompt(history) == chat(chat_tokenizer).generation_prompt(
        TWO_EXCHANGES
    )
    # The Alpaca template has no turns: only the latest message is the instruction.
    codec = alpaca(tokenizer)
    assert codec.chat_prompt(history) == codec.generation_prompt(alpaca_record("And EBITDA?", ""))


def test_training_batch_predicts_each_target_from_the_token_before(tokenizer: Any) -> None:
    codec = alpaca(tokenizer)
    features = [codec.encode(r) for r in (EBITDA, PE)]
    batch = codec.training_batch(features)
    width = max(len(f.ids) for f in features)
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, width)
    assert batch.real_tokens == sum(len(f.ids) for f in features)
    for row, f in enumerate(features):
        n = len(f.targets)
        assert batch.positions[row, :n].tolist() == [t - 1 for t in f.targets]
        assert batch.targets[row, :n].tolist() == [f.ids[t] for t in f.targets]
        assert (batch.positions[row, n:] == -1).all() and (batch.targets[row, n:] == IGNORE).all()
        assert batch.attention_mask[row].sum() == len(f.ids)
        assert (batch.input_ids[row, len(f.ids) :] == tokenizer.pad_token_id).all()


# ---- truncation and refusals -------------------------------------------------------------------


def test_truncation_cuts_the_input_to_keep_the_answer(tokenizer: Any) -> None:
    """As generation reads a long prompt: the template's header and "### Response:" stay, the
    input loses its end, and the answer keeps its tokens (at least half of max_length)."""
    full = alpaca(tokenizer).encode(PE)
    assert full is not None
    start, answer = full.targets[0], len(full.ids) - full.targets[0]
    whole = tokenizer.decode(full.ids[:start])
    for max_length in (start, start + 3, len(full.ids) - 1):
        cut = alpaca(tokenizer, max_length).encode(PE)
        assert cut is not None and len(cut.ids) <= max_length
        first = cut.targets[0]
        assert cut.targets == tuple(range(first, len(cut.ids)))  # answer tokens, to the end
        assert len(cut.targets) >= min(answer, max_length // 2)
        prompt = tokenizer.decode(cut.ids[:first])
        assert prompt.startswith(whole[:40]) and prompt.endswith(whole[-15:])
        assert cut.ids[first:] == full.ids[start : start + len(cut.targets)]
    assert alpaca(tokenizer, 5).encode(PE) is None  # not even the template fits


def test_multi_turn_chat_with_alpaca_template_is_refused(tokenizer: Any) -> None:
    with pytest.raises(FinloraError) as err:
        alpaca(tokenizer).encode(TWO_EXCHANGES)
    message = str(err.value)
    assert message.startswith("chat.jsonl:3: a multi-turn chat needs data.template: chat")
    assert "\n" not in message
    # One exchange is an instruction and an answer, whatever its shape.
    one = InstructRecord(TWO_EXCHANGES.messages[:3], "chat.jsonl:4")
    assert target_text(alpaca(tokenizer), one) == "Operating profit.</s>"


def test_chat_template_needs_a_tokenizer_with_one(tokenizer: Any) -> None:
    with pytest.raises(FinloraError, match=r"^data\.template: chat needs a model with a chat"):
        chat(tokenizer)


def test_alpaca_placeholders_in_user_text_are_left_alone() -> None:
    template = InstructTemplate.load("alpaca")
    prompt = template.prompt("Explain {input} and {x}.", "Price {instruction}")
    assert "### Instruction:\nExplain {input} and {x}.\n" in prompt
    assert "### Input:\nPrice {instruction}\n" in prompt


# ---- the loss ----------------------------------------------------------------------------------


@pytest.fixture
def lora_model(tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path) -> Callable[..., Any]:
    """A fresh tiny Llama with LoRA whose B matrices are non-zero, so the adapter matters."""

    def build(cfg: RunConfig, attention: str = "eager") -> Any:
        base = load_base_model(str(tiny_causal_dir), attention=attention)
        torch.manual_seed(0)
        model = build_method(base.model, cfg, base.kind)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_B" in name:
                    param.normal_(0, 0.5, generator=generator)
        return model

    return build


def test_loss_is_the_causal_lm_loss_on_answer_tokens(
    tiny_cfg: Callable[..., RunConfig], lora_model: Callable[..., Any], tokenizer: Any
) -> None:
    cfg = tiny_cfg("task=instruct", "data.template=alpaca")
    fast_model = lora_model(cfg, "eager").eval()
    plain_model = lora_model(cfg, "sdpa").eval()
    codec = alpaca(tokenizer)
    features = [codec.encode(r) for r in RECORDS]
    batch = codec.training_batch(features)
    # transformers' own loss, with every prompt and pad token masked out of the labels.
    labels = torch.full_like(batch.input_ids, IGNORE)
    for row, f in enumerate(features):
        labels[row, list(f.targets)] = torch.tensor([f.ids[t] for t in f.targets])
    with torch.no_grad():
        fast = loss_fn(fast_model, batch, codec.kind, fast=True)
        plain = loss_fn(plain_model, batch, codec.kind, fast=False)
        reference = fast_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-6)


def test_micro_batches_give_the_whole_batch_gradient(
    tiny_cfg: Callable[..., RunConfig], lora_model: Callable[..., Any], tokenizer: Any
) -> None:
    codec = alpaca(tokenizer)
    features = [codec.encode(r) for r in RECORDS]
    widths = [codec.width(f) for f in features]
    budget = max(widths) + 16
    assert len(token_budget_chunks(widths, budget)) > 2  # the budget does split this batch
    assert len({codec.target_count(f) for f in features}) > 2  # and unequal shares matter
    results = []
    for setting in ("null", str(budget)):
        cfg = tiny_cfg("task=instruct", "data.template=alpaca", f"speed.max_batch_tokens={setting}")
        model = lora_model(cfg)
        loss, real = accumulate_batch(model, codec, features, cfg, Placement(CPU, None, ""))
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss, real, grads))
    (whole_loss, whole_real, whole), (micro_loss, micro_real, micro) = results
    assert whole_real == micro_real == sum(widths)
    assert micro_loss == pytest.approx(whole_loss, abs=1e-5)
    for a, b in zip(whole, micro, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_records_cut_to_max_length_are_counted(tokenizer: Any) -> None:
    full = alpaca(tokenizer).encode(PE)
    assert full is not None
    codec = alpaca(tokenizer, len(full.ids) - 1)
    assert codec.encode(PE) is not None
    assert (codec.overflow.count, codec.overflow.longest) == (1, len(full.ids))
    roomy = alpaca(tokenizer, len(full.ids))
    roomy.encode(PE)
    assert roomy.overflow.count == 0
