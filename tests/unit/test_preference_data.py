"""Preference records: the shapes read (pairs and unpaired, Alpaca prompts and chat messages, TRL's
conversational answers), one-line refusals naming file and line, the objective's check, the
packaged synthetic set and its KTO form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finlora.config import DataConfig
from finlora.data.fin_preference import (
    FIN_PREFERENCE_NOTE,
    PAIRS_PER_KIND,
    fin_preference_kto,
    fin_preference_set,
)
from finlora.data.instruct import Message
from finlora.data.preference import (
    check_objective,
    load_preference,
    unpaired,
    write_preference,
)
from finlora.data.preference_prepare import prepare_preference
from finlora.errors import FinloraError

CHAT = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Buy now?"}]


def jsonl(path: Path, *rows: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pairs_and_unpaired_records_in_both_prompt_forms(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "prefs.jsonl",
        {"prompt": "Compute the ratio.", "input": "5 / 4", "chosen": "1.25", "rejected": "0.8"},
        {"messages": CHAT, "chosen": "It depends.", "rejected": "Yes!"},
        {"prompt": [{"role": "user", "content": "Safe?"}], "completion": "No.", "label": True},
        {"prompt": "Safe?", "completion": [{"role": "assistant", "content": "Yes."}],
         "label": False},
    )  # fmt: skip
    alpaca, chat, conversational, kto = load_preference(path)
    assert (alpaca.instruction, alpaca.input, alpaca.response, alpaca.rejected) == (
        "Compute the ratio.", "5 / 4", "1.25", "0.8"
    )  # fmt: skip
    assert alpaca.paired and alpaca.answers == (("1.25", True), ("0.8", False))
    assert alpaca.source == f"{path}:1"
    # A chat prompt keeps its turns; the chosen answer is the last assistant message.
    assert chat.instruction is None
    assert chat.messages == (
        Message("system", "Be careful."), Message("user", "Buy now?"),
        Message("assistant", "It depends."),
    )  # fmt: skip
    assert chat.prompt_messages == chat.messages[:-1] and chat.rejected == "Yes!"
    assert not conversational.paired and conversational.desirable is True
    assert conversational.answers == (("No.", True),)
    assert kto.response == "Yes." and kto.desirable is False


def test_written_records_read_back_the_same(tmp_path: Path) -> None:
    records = fin_preference_set()[:5] + fin_preference_kto()[:4]
    path = tmp_path / "out.jsonl"
    write_preference(records, path)
    again = load_preference(path)
    assert [(r.messages, r.instruction, r.input, r.rejected, r.desirable) for r in again] == [
        (r.messages, r.instruction, r.input, r.rejected, r.desirable) for r in records
    ]


BAD = [
    ({"prompt": "Q?", "chosen": "A"}, "missing 'rejected'"),
    ({"prompt": "Q?", "chosen": "A", "rejected": "A "}, "'chosen' and 'rejected' are the same"),
    ({"prompt": "Q?", "chosen": "", "rejected": "B"}, "empty 'chosen'"),
    ({"prompt": "Q?", "chosen": 3, "rejected": "B"}, "'chosen' must be a string"),
    ({"chosen": "A", "rejected": "B"}, "missing 'prompt' (or 'messages')"),
    ({"prompt": "Q?", "answer": "A"}, "neither a pair (prompt, chosen, rejected) nor an unpaired"),
    ({"prompt": "Q?", "chosen": "A", "rejected": "B", "completion": "C", "label": True},
     "both a pair"),
    ({"prompt": "Q?", "completion": "A", "label": "yes"}, "'label' must be true"),
    ({"prompt": "Q?", "completion": "A"}, "'label' must be true"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
      "chosen": "B", "rejected": "C"}, "'messages' must end with the user's turn"),
    ({"messages": [{"role": "boss", "content": "Q?"}], "chosen": "B", "rejected": "C"},
     "role must be one of"),
    ({"messages": CHAT, "input": "x", "chosen": "B", "rejected": "C"}, "'input' goes with"),
    ({"prompt": ["Q?"], "chosen": "B", "rejected": "C"}, "must be an object"),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "B"}], "rejected": "C"},
     "'chosen' must be the assistant's answer"),
    ([1, 2], "expected an object, got list"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "fragment"), BAD)
def test_a_malformed_record_is_one_line_naming_file_and_line(
    tmp_path: Path, row: object, fragment: str
) -> None:
    good = {"prompt": "Q?", "chosen": "A", "rejected": "B"}
    path = jsonl(tmp_path / "bad.jsonl", good, good, row)
    with pytest.raises(FinloraError) as info:
        load_preference(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and "\n" not in message
    assert fragment in message


def test_malformed_json_and_empty_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Q?", "chosen": "A", "rejected": "B"}\n{"prompt": \n', "utf-8")
    with pytest.raises(FinloraError, match=rf"^{broken}:2: malformed JSON"):
        load_preference(broken)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", "utf-8")
    with pytest.raises(FinloraError, match="file is empty"):
        load_preference(empty)
    with pytest.raises(FinloraError, match="is a directory"):
        load_preference(tmp_path)


def test_pair_objectives_refuse_unpaired_records(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "mixed.jsonl",
        {"prompt": "Q?", "chosen": "A", "rejected": "B"},
        {"prompt": "Q?", "completion": "A", "label": True},
    )
    records = load_preference(path)
    for objective in ("dpo", "orpo"):
        with pytest.raises(FinloraError) as info:
            check_objective(records, objective)
        assert str(info.value).startswith(f"{path}:2: an unpaired record")
        assert "use preference.objective=kto" in str(info.value)
    check_objective(records, "kto")  # KTO reads both: a pair is one answer of each kind


def test_packaged_set_is_synthetic_deterministic_and_balanced() -> None:
    records = fin_preference_set()
    assert len(records) == 3 * PAIRS_PER_KIND == 330
    assert records == fin_preference_set()  # the same every time
    kinds = [r.source.split(":")[2] for r in records]
    assert kinds[:6] == ["hedged", "worked", "grounded"] * 2
    assert {k: kinds.count(k) for k in set(kinds)} == dict.fromkeys(
        ("hedged", "worked", "grounded"), PAIRS_PER_KIND
    )
    assert len({(r.instruction, r.input) for r in records}) == len(records)  # no prompt twice
    assert all(r.paired and r.response != r.rejected for r in records)
    assert "SYNTHETIC" in FIN_PREFERENCE_NOTE and "not real data" in FIN_PREFERENCE_NOTE


def test_packaged_pairs_say_what_they_are_about() -> None:
    by_kind: dict[str, list] = {}
    for r in fin_preference_set():
        by_kind.setdefault(r.source.split(":")[2], []).append(r)
    # Worked answers show the formula and the working; the wrong ones give a figure alone.
    for r in by_kind["worked"]:
        assert " = " in r.response and r.response.count("=") >= 2
        assert "=" not in r.rejected
    # Grounded answers decline to guess a figure the text lacks, or quote the one it has.
    for r in by_kind["grounded"]:
        assert "won't guess" in r.response or "According to the text" in r.response
        if "According to the text" in r.response:
            figure = r.response.split("EUR ")[1]
            assert f"EUR {figure.removesuffix('.')}" in r.input
    for r in by_kind["hedged"]:
        assert any(w in r.rejected for w in ("certain", "guaranteed", "best", "completely safe"))


def test_kto_form_unpairs_every_pair() -> None:
    pairs, kto = fin_preference_set(), fin_preference_kto()
    assert len(kto) == 2 * len(pairs)
    assert [r.desirable for r in kto[:4]] == [True, False, True, False]
    assert kto[0].response == pairs[0].response and kto[1].response == pairs[0].rejected
    assert kto[0].prompt_messages == kto[1].prompt_messages == pairs[0].prompt_messages
    assert unpaired(kto) == kto  # already unpaired


def test_prepare_splits_the_packaged_set_or_a_file(tmp_path: Path) -> None:
    data = prepare_preference(DataConfig(test_fraction=0.1, val_fraction=0.1), seed=42)
    assert data.description == FIN_PREFERENCE_NOTE and data.synthetic
    sizes = [len(getattr(data.split, n)) for n in ("train", "validation", "test")]
    assert sizes == [267, 30, 33]
    assert data.records_sha256 is not None
    assert prepare_preference(DataConfig(), seed=42).split == data.split
    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}", "label": i % 3 > 0} for i in range(30)]
    path = jsonl(tmp_path / "kto.jsonl", *rows)
    own = prepare_preference(DataConfig(path=str(path)), seed=1)
    assert own.files == [path] and not own.synthetic and own.records_sha256 is None
    # Desirable and undesirable records are held out in proportion.
    test = [own.examples[i].desirable for i in own.split.test]
    assert True in test and False in test
