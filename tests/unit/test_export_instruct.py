"""Export of an instruct run on the tiny Llama (Alpaca template): the merged checkpoint answers
as the run does, the check compares answer-token logits (and llama.cpp's, for GGUF), and it
falls back to fixed records when the run's data is gone."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import export  # the same call, on the whole test split

from finlora.chat import answer, instruction_prompt
from finlora.config import load_config
from finlora.errors import FinloraError
from finlora.export.instruct import FIXED_RECORDS, instruct_sample, order, token_scores
from finlora.generate import GenerationOptions
from finlora.inference import load_run
from finlora.runs import DataFingerprint, SplitRecord
from finlora.train import train

RECORDS = [
    ("What is EBITDA?", "", "Earnings before interest, taxes, depreciation and amortisation."),
    ("Define net debt.", "", "Borrowings minus cash and cash equivalents."),
    ("What is the sentiment of this news?", "Net sales fell 30 %.", "Negative."),
    ("What is the sentiment of this news?", "Operating profit rose.", "Positive."),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    rows = [
        {"instruction": f"{i} (case {k})", "input": x, "output": o}
        for k in range(6)
        for i, x, o in RECORDS
    ]
    data = tmp_path_factory.mktemp("instruct-export-data") / "fin.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(None, [*tiny_overrides, "task=instruct", f"data.path={data}",
                             "data.template=alpaca", "data.max_length=256",
                             "train.learning_rate=0.01", "train.max_steps=6"])  # fmt: skip
    output = tmp_path_factory.mktemp("instruct-export") / "run"
    train(cfg, output, progress_bar=False, log=lambda _msg: None)
    return output


def test_hf_export_answers_as_the_run_does(run_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = export(run_dir, "hf", tmp_path / "hf")
    v = result.verification
    assert result.task == "instruct" and result.verified
    test_rows = len(json.loads((run_dir / "split.json").read_text())["test"])
    assert v.n == test_rows and v.answer_tokens is not None and v.answer_tokens > v.n
    assert v.token_agreement == 1.0 and v.label_agreement is None
    assert v.max_abs_logit_diff is not None and v.max_abs_logit_diff < 1e-4
    assert v.changed_tensors > 0
    # Greedy answers of plain transformers on the export equal finlora's on the run.
    loaded = load_run(run_dir)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    options = GenerationOptions(max_new_tokens=12)
    for instruction, input_text, _ in RECORDS[:2]:
        prompt = instruction_prompt(loaded, instruction, input_text)
        ours = answer(loaded, prompt, options, lambda _: None).text
        with torch.no_grad():
            out = exported.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                eos_token_id=loaded.codec.tokenizer.eos_token_id,
                pad_token_id=loaded.codec.tokenizer.pad_token_id,
            )  # fmt: skip
        theirs = loaded.codec.tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
        assert theirs.strip() == ours
    record = json.loads((tmp_path / "hf" / "finlora_export.json").read_text())
    assert record["task"] == "instruct" and record["template"] == "alpaca"
    assert "{instruction}" in record["prompt_input"] and "labels" not in record
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "instruction-tuning" in card and f"answer tokens of {test_rows} records" in card


@pytest.mark.parametrize(("quant", "max_diff"), [("f16", 0.05), ("q8_0", 0.3)])
def test_gguf_agrees_in_llama_cpp(
    run_dir: Path, tmp_path: Path, quant: str, max_diff: float
) -> None:
    result = export(run_dir, "gguf", tmp_path / "gguf", quant=quant)
    v = result.verification
    # CI installs the llama extra (`make test`), so llama.cpp really runs here.
    assert v.gguf_checked, v.gguf_note
    assert v.gguf_n == v.n and v.gguf_tokens_equal == 1.0
    assert v.gguf_max_abs_loglik_diff is not None and v.gguf_max_abs_loglik_diff < max_diff
    assert v.gguf_agreement is not None and v.gguf_agreement >= 0.9
    # The card's llama-cpp-python snippet runs as written; the Modelfile holds the run's prompt.
    out = tmp_path / "gguf"
    card = (out / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    proc = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd=out
    )
    assert proc.returncode == 0, proc.stderr
    assert f"llama-cli -m run-{quant}.gguf -no-cnv" in card and "ollama run run " in card
    assert (out / "Modelfile").read_text() == (
        f"# ollama create run -f Modelfile\nFROM ./run-{quant}.gguf\n"
        'TEMPLATE """Below is an instruction that describes a task. Write a response that '
        "appropriately completes the request.\n\n### Instruction:\n{{ .Prompt }}\n\n"
        '### Response:\n"""\nPARAMETER stop "</s>"\n'
    )


def test_a_failed_check_writes_nothing(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf16"
    with pytest.raises(FinloraError, match="next tokens agree .*nothing written"):
        export(run_dir, "hf", out, dtype="f16", tolerance=1e-9)
    assert not out.exists()


def test_sample_falls_back_to_fixed_records_without_the_data(run_dir: Path) -> None:
    loaded = load_run(run_dir)
    split = json.loads((run_dir / "split.json").read_text())
    sample = instruct_sample(loaded.run, loaded.instruct_codec, None)
    assert sample.description.startswith("test split of ")
    assert len(sample.features) == len(split["test"])
    gone = SplitRecord.read(run_dir / "split.json")
    gone = dataclasses.replace(
        gone, fingerprint=DataFingerprint({str(run_dir / "nowhere.jsonl"): "0" * 64})
    )
    fixed = instruct_sample(dataclasses.replace(loaded.run, split=gone), loaded.instruct_codec, 3)
    assert fixed.description.startswith("fixed instructions")
    assert [r.response for r in fixed.records] == [row[2] for row in FIXED_RECORDS[:3]]


def test_token_scores_are_the_answer_tokens_in_order(run_dir: Path) -> None:
    """Each answer token's log-prob, as the model gives it for that record alone."""
    loaded = load_run(run_dir)
    sample = instruct_sample(loaded.run, loaded.instruct_codec, None)
    scores = token_scores(loaded.model, loaded.instruct_codec, sample)
    assert len(scores.predicted) == sample.tokens == scores.logp.numel()

    expected = []
    for i in order(sample):
        f = sample.features[i]
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([f.ids])).logits[0]  # (T, V)
        logp = torch.log_softmax(logits.float(), -1)
        expected += [float(logp[t - 1, f.ids[t]]) for t in f.targets]
    torch.testing.assert_close(scores.logp, torch.tensor(expected), atol=1e-4, rtol=0)


def test_copy_without_data_exports_on_fixed_records(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy)
    split = json.loads((copy / "split.json").read_text())
    split["files"] = {str(tmp_path / "moved.jsonl"): "0" * 64}
    (copy / "split.json").write_text(json.dumps(split))
    result = export(copy, "state_dict", tmp_path / "sd")
    assert result.verification.data.startswith("fixed instructions")
    assert result.verification.n == len(FIXED_RECORDS)
    assert result.verification.token_agreement == 1.0
