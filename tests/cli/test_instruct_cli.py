"""The instruct task through the real entry point, on the tiny Llama with the Alpaca template:
train, eval (perplexity, BLEU, ROUGE), generate, chat in a real terminal, the packaged data set,
and the one-line refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_support import Result, assert_user_error, set_args

from finlora.config import load_config
from finlora.data import FPB_LABELS, synthetic_sentiment
from finlora.data.fin_instruct import fin_instruct_set
from finlora.data.instruct import Message, load_instruct
from finlora.train import train

TERMS = {
    "EBITDA": "earnings before interest, taxes, depreciation and amortisation.",
    "EBIT": "earnings before interest and taxes, a measure of operating profit.",
    "free cash flow": "operating cash flow minus capital expenditure.",
    "working capital": "current assets minus current liabilities.",
    "a dividend": "a payment a company makes to its shareholders out of its profits.",
    "the P/E ratio": "the share price divided by earnings per share.",
    "gross margin": "revenue minus the cost of goods sold, as a share of revenue.",
    "net debt": "borrowings minus cash and cash equivalents.",
    "an order book": "the value of orders received but not yet delivered.",
    "goodwill": "the price paid for a business above the fair value of its net assets.",
    "a share buyback": "a company buying back its own shares from the market.",
    "market capitalisation": "the share price times the number of shares outstanding.",
}
SENTIMENT_ANSWERS = {
    "negative": "Negative: bad news for shareholders.",
    "neutral": "Neutral: a fact with no clear effect.",
    "positive": "Positive: good news for shareholders.",
}
RECORDS = 40


def instruct_rows() -> list[dict[str, object]]:
    """40 Alpaca records: 24 short Q&A on terms, 16 sentiment questions with a label."""
    rows: list[dict[str, object]] = []
    for term, meaning in TERMS.items():
        rows.append({"instruction": f"What is {term}?", "output": f"It is {meaning}"})
        rows.append({"instruction": f"Define {term}.", "input": "", "output": meaning.capitalize()})
    for example in synthetic_sentiment(16, seed=3):
        rows.append(
            {
                "instruction": "What is the sentiment of this news?",
                "input": example.text,
                "output": SENTIMENT_ANSWERS[example.label],
                "label": example.label,
                "labels": list(FPB_LABELS),
            }
        )
    assert len(rows) == RECORDS
    return rows


@pytest.fixture(scope="module")
def instruct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("instruct-data") / "fin.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in instruct_rows()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny-instruct.yaml"
    path.write_text(
        "# finlora train tiny-instruct.yaml --set model.name=DIR --set data.path=FILE\n"
        "seed: 42\ntask: instruct\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def instruct_overrides(tiny_overrides: list[str], instruct_file: Path) -> list[str]:
    """The tiny setup as an instruct run: the tiny tokenizer has no chat template."""
    return [*tiny_overrides, f"data.path={instruct_file}", "data.template=alpaca",
            "data.max_length=256", "train.learning_rate=0.01"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, instruct_overrides: list[str]) -> Path:
    cfg = load_config(None, ["task=instruct", *instruct_overrides, "train.max_steps=6"])
    output = tmp_path_factory.mktemp("instruct-cli") / "run"
    train(cfg, output, progress_bar=False, log=lambda _msg: None)
    return output


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    output = tmp_path_factory.mktemp("classify-cli") / "run"
    train(load_config(None, [*tiny_overrides, "train.max_steps=1"]), output, progress_bar=False,
          log=lambda _msg: None)  # fmt: skip
    return output


def test_train_writes_an_instruct_run(
    cli: Callable[..., Result], config_file: Path, instruct_overrides: list[str], tmp_path: Path
) -> None:
    output = tmp_path / "runs" / "instruct"
    args = set_args([*instruct_overrides, "train.max_steps=3"])
    result = cli("train", config_file, "--output", output, "--no-progress", *args)
    assert result.code == 0, result.err
    assert result.out.splitlines()[0].startswith("trained 3 steps in ")
    assert result.out.splitlines()[-1] == f"run directory: {output}"
    assert "skipped" not in result.err  # every record fits data.max_length
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["task"] == "instruct" and manifest["steps"] == 3
    split = json.loads((output / "split.json").read_text())
    assert split["task"] == "instruct" and split["labels"] == list(FPB_LABELS)
    assert sum(len(split[name]) for name in ("train", "validation", "test")) == RECORDS
    epochs = [
        json.loads(line)
        for line in (output / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "epoch"
    ]
    assert epochs and epochs[-1]["best"]
    assert {"val_loss", "val_perplexity"} <= set(epochs[-1]) and "val_accuracy" not in epochs[-1]
    assert (output / "adapter").is_dir()


def _eval(cli: Callable[..., Result], run_dir: Path, *extra: str) -> dict[str, Any]:
    result = cli("eval", run_dir, "--json", "--no-progress", "--max-new-tokens", "8", *extra)
    assert result.code == 0, result.err
    (line,) = result.out.splitlines()
    metrics: dict[str, Any] = json.loads(line)
    return metrics


def test_eval_json_and_reports(cli: Callable[..., Result], run_dir: Path) -> None:
    metrics = _eval(cli, run_dir)
    assert {"perplexity", "bleu", "rouge1", "rouge2", "rougeL", "n"} <= set(metrics)
    test = json.loads((run_dir / "split.json").read_text())["test"]
    assert metrics["n"] == len(test) == 8
    assert metrics["task"] == "instruct" and metrics["zero_shot"] is False
    assert 1 < metrics["perplexity"] < 1000
    assert 0 <= metrics["bleu"] <= 100
    eval_dir = run_dir / "eval"
    for name in ("test.json", "test.txt", "test_answers.jsonl", "test_rougeL.png"):
        assert (eval_dir / name).is_file(), name
    assert json.loads((eval_dir / "test.json").read_text())["n"] == len(test)
    rows = [json.loads(line) for line in (eval_dir / "test_answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(test)
    references = {r["output"] for r in instruct_rows()}
    for row in rows:
        assert {"source", "prompt", "reference", "answer", "rougeL"} <= set(row)
        assert row["reference"] in references and isinstance(row["answer"], str)
    labelled = sum(1 for row in rows if row["reference"] in SENTIMENT_ANSWERS.values())
    assert labelled > 0 and metrics["label_n"] == labelled


def test_eval_zero_shot_is_the_base_model(cli: Callable[..., Result], run_dir: Path) -> None:
    tuned = _eval(cli, run_dir)
    base = _eval(cli, run_dir, "--zero-shot")
    assert base["zero_shot"] is True and base["n"] == tuned["n"]
    assert (run_dir / "eval" / "zero-shot-test.json").is_file()
    assert (run_dir / "eval" / "zero-shot-test_rougeL.png").is_file()
    # The adapter learned the answers' words: its held-out perplexity is the lower.
    assert tuned["perplexity"] < base["perplexity"]


def test_eval_text(cli: Callable[..., Result], run_dir: Path, instruct_file: Path) -> None:
    result = cli("eval", run_dir, "--no-progress", "--max-new-tokens", "4")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"run on test split of {instruct_file}"
    assert lines[1].split() == ["answers", "8"]
    assert lines[2].lstrip().startswith("perplexity ")
    assert lines[-1] == f"reports: {run_dir / 'eval'}"


def test_eval_refuses_options_for_classification_files(
    cli: Callable[..., Result], run_dir: Path, instruct_file: Path
) -> None:
    result = cli("eval", run_dir, "--data", instruct_file, "--label-map", "0=negative")
    assert_user_error(result, "--label-map: reads a classification file", "is an instruct run")


def test_eval_notes_prompts_cut_to_fit(
    cli: Callable[..., Result], run_dir: Path, tmp_path: Path
) -> None:
    long_input = " ".join(f"Revenue in quarter {i} rose to EUR {i} mn." for i in range(150))
    rows = [{"instruction": "Summarise.", "input": long_input, "output": "Sales grew."}] * 3
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = cli(
        "eval", run_dir, "--data", data, "--json", "--no-progress", "--max-new-tokens", "4"
    )
    assert result.code == 0, result.err
    metrics = json.loads(result.out)
    assert metrics["prompts_cut"] == 3 and metrics["perplexity_records"] <= 3
    assert "note: 3 of 3 prompts were cut to fit data.max_length" in result.err


def test_generate_json(cli: Callable[..., Result], run_dir: Path) -> None:
    result = cli("generate", run_dir, "--instruction", "What is EBITDA?", "--json",
                 "--max-new-tokens", "6")  # fmt: skip
    assert result.code == 0, result.err
    (line,) = result.out.splitlines()
    row = json.loads(line)
    assert row["instruction"] == "What is EBITDA?" and row["input"] == ""
    assert isinstance(row["answer"], str) and row["finish_reason"] in ("stop", "length")


def test_generate_streams_without_json(cli: Callable[..., Result], run_dir: Path) -> None:
    result = cli("generate", run_dir, "--instruction", "Define net debt.", "--input", "x",
                 "--max-new-tokens", "6")  # fmt: skip
    assert result.code == 0, result.err
    assert result.out.endswith("\n")


def test_generate_notes_a_cut_prompt_and_an_unused_system(
    cli: Callable[..., Result], run_dir: Path
) -> None:
    result = cli("generate", run_dir, "--instruction", "Summarise.", "--input", "word " * 600,
                 "--system", "Be brief.", "--max-new-tokens", "2", "--json")  # fmt: skip
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2, result.err
    assert "template has no system prompt" in notes[0]
    assert notes[1].startswith("note: 1 of 1 prompt(s) longer than data.max_length=")


def test_export_checks_answer_tokens(
    cli: Callable[..., Result], run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    result = cli("export", run_dir, "--format", "hf", "--out", out, "--verify-n", "3")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith(f"wrote hf (f32) to {out}: README.md, config.json, ")
    assert lines[1].startswith("verified on 3 records (")
    assert lines[1].endswith("next tokens agree 100.0%")


def test_predict_refuses_an_instruct_run(cli: Callable[..., Result], run_dir: Path) -> None:
    result = cli("predict", run_dir, "Sales rose 5 %.")
    assert_user_error(
        result, f"{run_dir}: this run's task is instruct, not classify", "finlora generate"
    )


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_chat_and_generate_refuse_a_classify_run(
    cli: Callable[..., Result], classify_run: Path, command: str
) -> None:
    extra = ("--instruction", "What is EBIT?") if command == "generate" else ()
    result = cli(command, classify_run, *extra)
    assert_user_error(
        result, f"{classify_run}: this run's task is classify, not instruct", "finlora predict"
    )


def test_malformed_data_file_is_refused_before_the_run(
    cli: Callable[..., Result], config_file: Path, instruct_overrides: list[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps(r) for r in instruct_rows()[:5]]
    rows.insert(3, json.dumps({"instruction": "What is EBIT?", "output": 7}))
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
    output = tmp_path / "runs" / "bad"
    args = set_args([*instruct_overrides, f"data.path={bad}"])
    result = cli("train", config_file, "--output", output, *args)
    assert_user_error(result, f"{bad}:4: 'output' must be a string (got int)")
    assert not output.exists() and not (tmp_path / "runs").exists()


def test_chat_template_without_one_is_refused(
    cli: Callable[..., Result],
    config_file: Path,
    tiny_overrides: list[str],
    instruct_file: Path,
    tmp_path: Path,
) -> None:
    # An instruct config that names no template means the model's own chat template.
    output = tmp_path / "runs" / "chat"
    args = set_args([*tiny_overrides, f"data.path={instruct_file}"])
    result = cli("train", config_file, "--output", output, *args)
    assert_user_error(result, "data.template: chat needs a model with a chat template",
                      "use data.template: alpaca")  # fmt: skip
    assert not output.exists()


def test_data_fin_instruct_writes_the_packaged_set(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    out = tmp_path / "fin.jsonl"
    result = cli("data", "fin-instruct", out)
    assert result.code == 0, result.err
    expected = fin_instruct_set()
    assert result.err.startswith(f"wrote {len(expected)} records to {out}")
    records = load_instruct(out)
    assert len(records) == len(expected) == 240
    assert [(r.messages, r.label) for r in records] == [(r.messages, r.label) for r in expected]
    assert_user_error(cli("data", "fin-instruct", out), f"{out}: exists (use --overwrite")
    assert cli("data", "fin-instruct", out, "--overwrite").code == 0
    assert_user_error(cli("data", "fin-instruct", tmp_path, "--overwrite"), "is a directory")
    assert_user_error(cli("data", "fin-instruct", tmp_path / "fin.csv"), "name a .jsonl or .json")


# ---- chat in a real terminal -------------------------------------------------------------------


class Terminal:
    """A child process on a pseudo-terminal, read with deadlines so a hang fails the test."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        master, slave = pty.openpty()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "TERM": "dumb"}  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True
        )
        os.close(slave)
        self.master = master
        self.seen = ""

    def read_until(self, marker: str, timeout: float) -> str:
        """Everything up to and including `marker`; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {marker!r} within {timeout} s; the terminal shows {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    pytest.fail(f"terminal closed before {marker!r}; it showed {self.seen!r}")
                self.seen += chunk.decode("utf-8", errors="replace")
        text, self.seen = self.seen.split(marker, 1)
        return text + marker

    def write(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_chat_in_a_terminal(run_dir: Path, tmp_path: Path) -> None:
    code = "from finlora.cli import main; main()"
    args = [sys.executable, "-c", code, "chat", str(run_dir), "--max-new-tokens", "8"]
    term = Terminal(args, tmp_path)
    try:
        banner = term.read_until("you> ", timeout=180)  # a fresh interpreter imports torch
        assert "the alpaca template" in banner and "/reset" in banner
        term.write("What is EBITDA?\n")
        term.read_until("assistant> ", timeout=30)
        streamed = term.read_until("you> ", timeout=60)
        assert streamed.removesuffix("you> ").strip(), "no answer was streamed"
        term.write("/reset\n")
        assert "(new conversation)" in term.read_until("you> ", timeout=30)
        term.write("/exit\n")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


def test_eval_refuses_a_packaged_set_that_changed_since_training(
    cli: Callable[..., Result],
    instruct_overrides: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The packaged set has no file to hash; its records' digest guards the rebuilt split."""
    cfg = load_config(None, [*instruct_overrides, "task=instruct", "data.path=null",
                             "train.max_steps=1"])  # fmt: skip
    run = tmp_path / "packaged"
    train(cfg, run, progress_bar=False, log=lambda _: None)
    split = json.loads((run / "split.json").read_text())
    assert len(split["records_sha256"]) == 64 and split["files"] == {}

    import finlora.data.prepare as prepare

    changed = fin_instruct_set()
    answer = Message("assistant", "A different answer.")
    changed[0] = dataclasses.replace(changed[0], messages=(*changed[0].messages[:-1], answer))
    monkeypatch.setattr(prepare, "fin_instruct_set", lambda: changed)
    result = cli("eval", run, "--max-new-tokens", "2")
    assert_user_error(result, "changed since training", "--data")


def test_a_seq2seq_model_trains_answers_evaluates_and_exports(
    cli: Callable[..., Result],
    instruct_overrides: list[str],
    tiny_seq2seq_dir: Path,
    config_file: Path,
    tmp_path: Path,
) -> None:
    """T5 / mT0 / BART: the prompt goes to the encoder, the answer is the decoder's."""
    run = tmp_path / "t5"
    args = set_args([*instruct_overrides, f"model.name={tiny_seq2seq_dir}", "train.max_steps=4"])
    result = cli("train", config_file, "--output", run, "--no-progress", *args)
    assert result.code == 0, result.err
    epoch = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "epoch"][-1]  # fmt: skip
    assert epoch["val_loss"] < epoch["train_loss"] + 1.0  # finite, and on the answer tokens
    result = cli("generate", run, "--instruction", "What is EBITDA?", "--json",
                 "--max-new-tokens", "6")  # fmt: skip
    assert result.code == 0, result.err
    answer = json.loads(result.out)["answer"]
    result = cli("eval", run, "--json", "--max-new-tokens", "6")
    assert result.code == 0, result.err
    metrics = json.loads(result.out)
    assert metrics["task"] == "instruct" and metrics["n"] > 0 and metrics["perplexity"] > 1
    out = tmp_path / "hf"
    result = cli("export", run, "--format", "hf", "--out", out)
    assert result.code == 0, result.err
    assert result.out.splitlines()[1].endswith("next tokens agree 100.0%")
    # The export answers as the run did, in plain transformers.
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from finlora.inference import load_run

    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    prompt = load_run(run).codec.chat_prompt([Message("user", "What is EBITDA?")])
    ids = exported.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(ids[0], skip_special_tokens=True).strip() == answer
    result = cli("export", run, "--format", "gguf", "--out", tmp_path / "gguf")
    assert result.code == 2 and not (tmp_path / "gguf").exists()
    assert result.err.splitlines()[-1] == (
        "finlora: error: GGUF export covers causal (Llama) models; export seq2seq models with "
        "--format hf"
    )
