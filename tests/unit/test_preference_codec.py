"""The preference codec: a record's prompt and answers are exactly the tokens an instruct run
trains on (chat template or Alpaca), its answers share one prompt, only answer tokens are
targets, and a record too long for max_length keeps its answers whole where it can."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from finlora.data.preference import PreferenceRecord, parse_preference
from finlora.errors import FinloraError
from finlora.prompts import InstructTemplate
from finlora.tasks.classify import IGNORE
from finlora.tasks.instruct import InstructCodec
from finlora.tasks.preference import PreferenceCodec

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PAIR = parse_preference(
    "t:1", {"prompt": "Compute the current ratio.", "input": "Assets 5.0, liabilities 4.0.",
            "chosen": "5.0 / 4.0 = 1.25.", "rejected": "It is 0.8."},
)  # fmt: skip
CHAT_PAIR = parse_preference(
    "t:2", {"messages": [{"role": "system", "content": "Be careful."},
                         {"role": "user", "content": "Should I buy now?"}],
            "chosen": "Nobody can say.", "rejected": "Yes."},
)  # fmt: skip
UNPAIRED = parse_preference("t:3", {"prompt": "Safe?", "completion": "No.", "label": False})


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer_dir: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    tok.chat_template = CHATML
    return tok


def codecs(tok: Any, template: str, max_length: int = 256) -> tuple[InstructCodec, PreferenceCodec]:
    instruct = InstructCodec(tok, InstructTemplate.load(template), max_length)
    return instruct, PreferenceCodec(
        InstructCodec(tok, InstructTemplate.load(template), max_length)
    )


@pytest.mark.parametrize(("template", "record"), [("alpaca", PAIR), ("chat", CHAT_PAIR)])
def test_prompt_and_answers_are_what_instruct_training_reads(
    tokenizer: Any, chat_tokenizer: Any, template: str, record: PreferenceRecord
) -> None:
    tok = chat_tokenizer if template == "chat" else tokenizer
    instruct, codec = codecs(tok, template)
    feature = codec.encode(record)
    assert feature is not None and feature.paired and feature.desirable == (True, False)
    # The chosen row is the instruct run's training sequence of the record, token for token,
    # with the same answer tokens as targets; and its prompt is what generation reads.
    trained = instruct.encode(record)
    assert trained is not None
    assert list(feature.prompt + feature.answers[0]) == trained.ids
    assert trained.targets == tuple(range(len(feature.prompt), len(trained.ids)))
    assert list(feature.prompt) == instruct.generation_prompt(record)
    rejected = tok.decode(list(feature.answers[1]))
    if template == "chat":
        assert rejected == "Yes.<|im_end|>\n"
    else:
        assert feature.answers[1][-1] == tok.eos_token_id
        assert tok.decode(list(feature.answers[1][:-1])) == "It is 0.8."


def test_batch_targets_only_the_answers(tokenizer: Any) -> None:
    _, codec = codecs(tokenizer, "alpaca")
    features = [codec.encode(PAIR), codec.encode(UNPAIRED)]
    assert all(f is not None for f in features)
    batch = codec.training_batch(features)  # type: ignore[arg-type]
    assert batch.input_ids.shape[0] == 3  # chosen, rejected, then the unpaired completion
    assert codec.desirable(features).tolist() == [True, False, False]  # type: ignore[arg-type]
    rows = [row for f in features for row in f.rows()]  # type: ignore[union-attr]
    for i, (prompt, answer) in enumerate(rows):
        real = batch.targets[i] != IGNORE
        assert batch.targets[i][real].tolist() == list(answer)
        positions = batch.positions[i][real]
        # Position p predicts token p + 1: the first answer token follows the prompt's last.
        assert positions.tolist() == list(range(len(prompt) - 1, len(prompt) + len(answer) - 1))
        assert batch.input_ids[i][positions + 1].tolist() == list(answer)
    assert codec.target_count(features[0]) == sum(len(a) for a in features[0].answers)  # type: ignore[union-attr, arg-type]


def test_too_long_a_record_loses_prompt_first_then_answers(tokenizer: Any) -> None:
    _, whole = codecs(tokenizer, "alpaca")
    full = whole.encode(PAIR)
    assert full is not None
    # Room for the answers and half the prompt: the prompt is cut (its input first), once counted.
    limit = len(full.prompt) // 2 + len(full.answers[0]) + 2
    limit = max(limit, 2 * len(full.answers[0]))
    _, codec = codecs(tokenizer, "alpaca", max_length=limit)
    cut = codec.encode(PAIR)
    assert cut is not None and cut.answers == full.answers and len(cut.prompt) < len(full.prompt)
    assert len(cut.prompt) + max(len(a) for a in cut.answers) <= limit
    assert codec.overflow.count == 1
    # Less room than the answers need: the prompt keeps half, the answers lose their ends.
    _, tight = codecs(tokenizer, "alpaca", max_length=12)
    short = tight.encode(PAIR)
    assert short is not None and len(short.prompt) == 6
    assert all(len(short.prompt) + len(a) <= 12 for a in short.answers)
    assert short.answers[0] == full.answers[0][:6]


def test_mismatched_answer_follows_another_prompt(tokenizer: Any) -> None:
    _, codec = codecs(tokenizer, "alpaca")
    a, b = codec.encode(PAIR), codec.encode(UNPAIRED)
    assert a is not None and b is not None
    assert codec.mismatched(a, b) == b.answers[0]
    assert codec.width(a) == 2 * (len(a.prompt) + max(len(x) for x in a.answers))


def test_seq2seq_models_are_refused(tokenizer: Any) -> None:
    with pytest.raises(FinloraError, match="task preference needs a causal language model"):
        PreferenceCodec(InstructCodec(tokenizer, InstructTemplate.load("alpaca"), 64, "seq2seq"))
