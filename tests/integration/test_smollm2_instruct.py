"""Instruction tuning of the real SmolLM2-135M-Instruct with the shipped recipe, on the packaged
financial instruction set, for a few steps: the tuned model's held-out perplexity on the
reference answers is lower than its base model's, on the same test split.

Kept short: four steps at a higher learning rate, a 12-record test split, short answers (about
three minutes on two busy CPU cores, less on an idle machine)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from finlora.config import load_config
from finlora.evaluate import evaluate_run
from finlora.train import train

pytestmark = pytest.mark.integration

RECIPE = Path(__file__).parents[2] / "configs" / "fin-instruct-smollm2-lora.yaml"
STEPS = 4
MAX_NEW_TOKENS = 32
BUDGET = [
    f"train.max_steps={STEPS}",
    "train.epochs=1",
    "train.learning_rate=1e-3",
    "data.test_fraction=0.05",
    "data.val_fraction=0.05",
]


@pytest.fixture(scope="module")
def measured(real_home: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train per the recipe on BUDGET, then evaluate the run and its zero-shot base."""
    cfg = load_config(RECIPE, BUDGET)
    out = tmp_path_factory.mktemp("runs") / "fin-instruct"
    train(cfg, out, progress_bar=False, log=lambda m: None)
    return {
        "run": out,
        "tuned": evaluate_run(out, progress=False, max_new_tokens=MAX_NEW_TOKENS),
        "base": evaluate_run(out, zero_shot=True, progress=False, max_new_tokens=MAX_NEW_TOKENS),
    }


def test_tuning_lowers_held_out_perplexity(measured: dict[str, Any]) -> None:
    tuned, base = measured["tuned"], measured["base"]
    test = json.loads((measured["run"] / "split.json").read_text())["test"]
    assert tuned["n"] == base["n"] == len(test) == 12
    assert tuned["answer_tokens"] == base["answer_tokens"] > 0
    assert math.isfinite(base["perplexity"]) and base["perplexity"] > 1
    assert tuned["perplexity"] < base["perplexity"], (tuned["perplexity"], base["perplexity"])


def test_run_is_an_instruct_run_on_the_packaged_set(measured: dict[str, Any]) -> None:
    run: Path = measured["run"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["task"] == "instruct" and manifest["steps"] == STEPS
    assert manifest["data"]["synthetic"] is True
    tuned = measured["tuned"]
    assert tuned["synthetic"] is True and tuned["max_new_tokens"] == MAX_NEW_TOKENS
    # The sentiment questions of the test split are checked as label answers.
    assert 0 < tuned["label_n"] < tuned["n"]
    assert 0 <= tuned["label_accuracy"] <= tuned["single_valid_label"] <= 1
    for stem in ("test", "zero-shot-test"):
        assert (run / "eval" / f"{stem}.json").is_file()
        assert (run / "eval" / f"{stem}_answers.jsonl").is_file()


def test_served_chat_answers_as_the_library_does(measured: dict[str, Any]) -> None:
    """The OpenAI-style route on the real chat template: the answer and token counts of the
    library call behind `finlora chat`."""
    from fastapi.testclient import TestClient

    from finlora.chat import answer, fit_conversation
    from finlora.data.instruct import Message
    from finlora.generate import GenerationOptions
    from finlora.inference import load_run
    from finlora.serve import create_app

    loaded = load_run(measured["run"])
    question = "What is EBITDA?"
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 24}
    served = TestClient(create_app(loaded)).post("/v1/chat/completions", json=body).json()
    prompt = fit_conversation(loaded, [], [Message("user", question)], 24)
    expected = answer(loaded, prompt, GenerationOptions(max_new_tokens=24), lambda _: None)
    assert served["choices"][0]["message"]["content"] == expected.text != ""
    assert served["usage"]["prompt_tokens"] == len(prompt)
    assert served["usage"]["completion_tokens"] == expected.new_tokens
