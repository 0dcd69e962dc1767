"""Preference tuning of the real SmolLM2-135M-Instruct with the shipped DPO recipe, kept short:
a dozen packaged pairs, two steps, then its eval beside the starting model, an answer through
the generation path, and a GGUF export that llama.cpp checks.

Kept short: the packaged set's short pairs (worked ratios: a line of working against a wrong
figure), 8 to train and 4 to test, two steps of two pairs at a high learning rate, answers of
8 tokens, no validation split."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from finlora.chat import answer, instruction_prompt
from finlora.config import load_config
from finlora.data.fin_preference import fin_preference_set
from finlora.data.preference import write_preference
from finlora.evaluate import evaluate_run
from finlora.export import ExportOptions, export_run
from finlora.generate import GenerationOptions
from finlora.inference import load_run
from finlora.train import train

pytestmark = pytest.mark.integration

RECIPE = Path(__file__).parents[2] / "configs" / "fin-preference-smollm2-dpo.yaml"
BUDGET = [
    "train.max_steps=2",
    "train.epochs=1",
    "train.batch_size=2",
    "train.learning_rate=5e-4",
    "train.log_every=1",
    "data.test_fraction=0.3",
    "data.val_fraction=0",
    "data.max_length=128",
]
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def measured(real_home: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("preference")
    data = work / "prefs.jsonl"
    worked = [r for r in fin_preference_set() if ":worked:" in r.source]
    write_preference(worked[:12], data)
    out = work / "fin-dpo"
    cfg = load_config(RECIPE, [*BUDGET, f"data.path={data}"])
    train(cfg, out, progress_bar=False, log=lambda m: None)
    metrics = evaluate_run(out, progress=False, max_new_tokens=MAX_NEW_TOKENS)
    return {"run": out, "metrics": metrics}


def test_dpo_moves_the_rewards_towards_the_chosen_answers(measured: dict[str, Any]) -> None:
    metrics, run = measured["metrics"], measured["run"]
    assert metrics["task"] == "preference" and metrics["objective"] == "dpo"
    assert metrics["n"] == metrics["pairs"] == 4
    assert metrics["reward_margin"] > 0 and metrics["reward_accuracy"] >= 0.75
    assert metrics["reward_chosen"] > metrics["reward_rejected"]
    for key in ("chosen_perplexity", "start_chosen_perplexity"):
        assert math.isfinite(metrics[key]) and metrics[key] > 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The policy starts as its reference: log 2, to bf16 rounding (the reference is measured
    # in the scoring path, the policy in the training path).
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.03)
    samples = (run / "eval" / "test_samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 and all(json.loads(s)["answer"] for s in samples)


def test_the_run_answers_and_exports_as_an_instruct_run(
    measured: dict[str, Any], tmp_path: Path
) -> None:
    run: Path = measured["run"]
    loaded = load_run(run)
    assert loaded.task == "instruct" and loaded.instruct_codec.template.is_chat
    prompt = instruction_prompt(loaded, "Compute the P/E ratio.", "Price EUR 42, EPS EUR 3.50.")
    options = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)
    reply = answer(loaded, prompt, options, lambda _text: None)
    assert reply.text.strip()
    result = export_run(run, ExportOptions("gguf", tmp_path / "gguf", verify_n=2))
    v = result.verification
    assert result.task == "preference" and result.verified
    assert v.token_agreement is not None and v.token_agreement >= 0.99
    if v.gguf_checked:  # llama-cpp-python installed (the dev extra)
        assert v.gguf_agreement is not None and v.gguf_agreement >= 0.9
