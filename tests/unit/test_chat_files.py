"""Chat files for task instruct: ShareGPT `conversations` and OpenAI `messages` records, told
apart per record (beside Alpaca) in .jsonl and .json list files; rendered through the model's
chat template with every assistant turn a target; one-line errors naming file and line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from finlora.config import RunConfig
from finlora.data.instruct import Message, load_instruct
from finlora.errors import FinloraError
from finlora.prompts import InstructTemplate
from finlora.tasks.instruct import InstructCodec
from finlora.train import train

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TURNS = [
    ("system", "Be brief."),
    ("user", "What is EBIT?"),
    ("assistant", "Operating profit."),
    ("user", "And EBITDA?"),
    ("assistant", "EBIT plus depreciation."),
]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(*turns: tuple[str, str], **extra: object) -> dict[str, object]:
    rows = [{"from": SHAREGPT_NAMES[role], "value": text} for role, text in turns]
    return {"conversations": rows, **extra}


def openai(*turns: tuple[str, str], **extra: object) -> dict[str, object]:
    return {"messages": [{"role": r, "content": t} for r, t in turns], **extra}


def write_jsonl(path: Path, *rows: object) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# ---- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_sharegpt_reads_as_the_same_conversation_as_openai(tmp_path: Path, suffix: str) -> None:
    rows = [sharegpt(*TURNS, label="none"), openai(*TURNS, label="none")]
    path = tmp_path / f"chat{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        write_jsonl(path, *rows)
    share, oai = load_instruct(path)
    assert share.messages == oai.messages == tuple(Message(r, t) for r, t in TURNS)
    assert share.label == oai.label == "none"
    assert share.instruction is None and share.response == "EBIT plus depreciation."
    lines = path.read_text(encoding="utf-8").split("\n")
    starts = [n for n, line in enumerate(lines, 1) if line in ("  {", "{") or line[:2] == '{"']
    assert [share.source, oai.source] == [f"{path}:{n}" for n in starts]


def test_a_file_mixes_the_three_shapes(tmp_path: Path) -> None:
    alpaca = {"instruction": "Define EBIT.", "output": "Operating profit."}
    path = write_jsonl(tmp_path / "mixed.jsonl", alpaca, sharegpt(*TURNS[1:3]), openai(*TURNS))
    records = load_instruct(path)
    assert [r.instruction for r in records] == ["Define EBIT.", None, None]
    assert [len(r.messages) for r in records] == [2, 2, 5]


BAD_SHAREGPT = {
    "unknown speaker": (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]},
        "conversations[1]: from must be one of system, human, gpt (got 'bot')",
    ),
    "openai role in sharegpt": (
        {"conversations": [{"from": "user", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        "conversations[0]: from must be one of system, human, gpt (got 'user')",
    ),
    "missing value": (
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "Hello"}]},
        "conversations[0]: missing 'value'",
    ),
    "value not a string": (
        {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "Hello"}]},
        "conversations[0]: 'value' must be a string (got int)",
    ),
    "ends with the human": (
        sharegpt(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")),
        "the last message must be the gpt's answer",
    ),
    "two human turns": (
        sharegpt(("user", "Hi"), ("user", "Anyone?"), ("assistant", "Hello")),
        "turns must alternate human, gpt, starting with human",
    ),
    "system not first": (
        sharegpt(("user", "Hi"), ("system", "Be brief."), ("assistant", "Hello")),
        "conversations[1]: a system message may only come first",
    ),
    "empty list": ({"conversations": []}, "'conversations' must be a non-empty list"),
    "turn not an object": (
        {"conversations": ["Hi", {"from": "gpt", "value": "Hello"}]},
        "conversations[0] must be an object with 'from' and 'value'",
    ),
    "openai role unknown": (
        openai(("user", "Hi"), ("gpt", "Hello")),
        "messages[1]: role must be one of system, user, assistant (got 'gpt')",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SHAREGPT))
def test_a_bad_chat_record_is_one_line_naming_file_and_line(tmp_path: Path, case: str) -> None:
    record, fragment = BAD_SHAREGPT[case]
    good = sharegpt(*TURNS)
    path = write_jsonl(tmp_path / "bad.jsonl", good, good, record, good)
    with pytest.raises(FinloraError) as err:
        load_instruct(path)
    assert str(err.value) == f"{path}:3: {fragment}"


def test_records_on_one_line_of_a_json_list_are_named_by_number(tmp_path: Path) -> None:
    path = tmp_path / "compact.json"
    bad = sharegpt(("user", "Hi"), ("user", "Anyone?"), ("assistant", "Hello"))
    path.write_text(json.dumps([sharegpt(*TURNS), openai(*TURNS), bad]), encoding="utf-8")
    with pytest.raises(FinloraError) as err:
        load_instruct(path)
    assert str(err.value) == (
        f"{path}:1 (record 3): turns must alternate human, gpt, starting with human"
    )


# ---- rendering and targets ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(tiny_causal_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a ChatML chat template in its tokenizer, as SmolLM2 has."""
    directory = tmp_path_factory.mktemp("tiny-chat-llama")
    shutil.copytree(tiny_causal_dir, directory, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    return directory


def test_every_gpt_turn_is_a_target_through_the_chat_template(
    chat_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir, local_files_only=True)
    (record,) = load_instruct(write_jsonl(tmp_path / "c.jsonl", sharegpt(*TURNS)))
    feature = InstructCodec(tokenizer, InstructTemplate.load("chat"), 256).encode(record)
    assert feature is not None
    rows = [{"role": r, "content": t} for r, t in TURNS]
    assert tokenizer.decode(feature.ids) == tokenizer.apply_chat_template(rows, tokenize=False)
    targets = tokenizer.decode([feature.ids[t] for t in feature.targets])
    assert targets == "Operating profit.<|im_end|>\nEBIT plus depreciation.<|im_end|>\n"


def test_a_run_trains_on_a_sharegpt_file(
    tiny_cfg: Callable[..., RunConfig], chat_model_dir: Path, tmp_path: Path
) -> None:
    answers = [f"{n} per cent." for n in range(20)]
    rows = [
        sharegpt(("user", f"Margin of firm {i}?"), ("assistant", a)) for i, a in enumerate(answers)
    ]
    path = write_jsonl(tmp_path / "share.jsonl", *rows)
    cfg = tiny_cfg(
        "task=instruct",
        f"data.path={path}",
        "data.template=chat",
        "train.max_steps=2",
        model=chat_model_dir,
    )
    result = train(cfg, tmp_path / "run", progress_bar=False, log=lambda _: None)
    assert result.steps == 2
