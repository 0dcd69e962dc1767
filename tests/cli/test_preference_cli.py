"""Preference tuning through the real entry point, on the tiny Llama with the Alpaca template: the
packaged set written out, DPO `--from` an instruct run, its eval beside the starting model, and
the run answering as an instruct run does (generate, GGUF export); the one-line refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_support import Result, assert_user_error, set_args
from gguf import GGUFReader

from finlora.config import load_config
from finlora.data.fin_preference import fin_preference_set
from finlora.data.preference import load_preference
from finlora.train import train

PAIRS = 40


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 40 pairs of the packaged set, with inputs kept short for the tiny tokenizer."""
    rows = [
        {"prompt": r.instruction, "input": (r.input or "")[:60], "chosen": r.response[:120],
         "rejected": r.rejected}
        for r in fin_preference_set()[:PAIRS]
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def overrides(tiny_overrides: list[str], pref_file: Path) -> list[str]:
    return [*tiny_overrides, f"data.path={pref_file}", "data.template=alpaca",
            "data.max_length=200", "train.learning_rate=0.01", "train.epochs=1"]  # fmt: skip


@pytest.fixture(scope="module")
def instruct_run(
    tmp_path_factory: pytest.TempPathFactory, overrides: list[str], pref_file: Path
) -> Path:
    """An instruct run on the pairs' prompts and chosen answers, the preference run's start."""
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.response}
            for r in load_preference(pref_file)]  # fmt: skip
    data = tmp_path_factory.mktemp("instruct") / "instruct.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(None, [*overrides, "task=instruct", f"data.path={data}", "train.max_steps=2"])
    out = tmp_path_factory.mktemp("runs") / "instruct"
    train(cfg, out, progress_bar=False, log=lambda _msg: None)
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, pref_file: Path) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny-dpo.yaml"
    path.write_text(
        "# finlora train tiny-dpo.yaml --from RUN\n"
        f"task: preference\ndata:\n  path: {pref_file}\npreference:\n  objective: dpo\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def dpo_run(
    tmp_path_factory: pytest.TempPathFactory, recipe: Path, instruct_run: Path,
    overrides: list[str],
) -> Path:  # fmt: skip
    """The recipe's run, as `finlora train RECIPE --from INSTRUCT_RUN` trains it."""
    start = f"method.start_from={instruct_run}"
    cfg = load_config(recipe, [*overrides, "train.max_steps=3", start])
    out = tmp_path_factory.mktemp("dpo") / "run"
    train(cfg, out, progress_bar=False, log=lambda _msg: None)
    return out


def test_train_from_an_instruct_run(
    cli: Callable[..., Result], recipe: Path, instruct_run: Path, overrides: list[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    dpo_run = tmp_path / "runs" / "dpo"
    args = set_args([*overrides, "train.max_steps=3"])
    result = cli("train", recipe, "--from", instruct_run, "--output", dpo_run, "--no-progress",
                 *args)  # fmt: skip
    assert result.code == 0, result.err
    assert result.out.splitlines()[0].startswith("trained 3 steps in ")
    assert "(val loss " in result.out.splitlines()[0]
    assert "reference log-probabilities of" in result.err
    assert "from the adapter the run starts from" in result.err
    config = (dpo_run / "config.yaml").read_text()
    assert f"start_from: {instruct_run}" in config
    assert (dpo_run / "start_adapter" / "adapter_model.safetensors").is_file()


def test_compare_ranks_objectives_from_an_instruct_run(
    cli: Callable[..., Result], recipe: Path, instruct_run: Path, overrides: list[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    output = tmp_path / "cmp"
    methods = "lora,lora[preference.objective=orpo,train.learning_rate=0.02]"
    args = set_args([*overrides, "train.max_steps=1"])
    result = cli("compare", recipe, "--from", instruct_run, "--methods", methods,
                 "--output", output, "--no-progress", "--json", *args)  # fmt: skip
    assert result.code == 0, result.err
    rows = json.loads(result.out.splitlines()[-1])["methods"]
    assert [r["label"] for r in rows] == [
        "lora", "lora[preference.objective=orpo,train.learning_rate=0.02]"
    ]  # fmt: skip
    assert [r["learning_rate"] for r in rows] == [0.01, 0.02]
    assert all(0 <= r["reward_accuracy"] <= 1 for r in rows)
    for name, objective in (("lora", "dpo"), (rows[1]["label"], "orpo")):
        run = Path(rows[[r["label"] for r in rows].index(name)]["run_dir"])
        config = (run / "config.yaml").read_text()
        assert f"objective: {objective}" in config and f"start_from: {instruct_run}" in config


def test_eval_reports_the_run_beside_its_starting_model(
    cli: Callable[..., Result], dpo_run: Path, pref_file: Path
) -> None:
    result = cli("eval", dpo_run, "--no-progress", "--max-new-tokens", "4")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith(f"{dpo_run.name} on test split of ")
    assert lines[0].endswith("(objective dpo, beta 0.1)")
    assert lines[1].split()[:4] == ["records", "8", "(8", "pairs,"]
    assert lines[2].lstrip().startswith("reward accuracy ")
    assert any(line.lstrip().startswith("log-prob accuracy ") for line in lines)
    assert lines[-1] == f"reports: {dpo_run / 'eval'}"
    json_result = cli("eval", dpo_run, "--json", "--no-progress", "--max-new-tokens", "4")
    metrics: dict[str, Any] = json.loads(json_result.out)
    assert metrics["task"] == "preference" and metrics["n"] == 8
    for name in ("test.json", "test.txt", "test_records.jsonl", "test_samples.jsonl"):
        assert (dpo_run / "eval" / name).is_file(), name
    # Any preference file: every record of it, reported under its own name.
    on_file = cli("eval", dpo_run, "--data", pref_file, "--json", "--no-progress",
                  "--max-new-tokens", "2")  # fmt: skip
    assert on_file.code == 0, on_file.err
    metrics = json.loads(on_file.out)
    assert metrics["n"] == metrics["pairs"] == PAIRS and metrics["data"] == str(pref_file)
    assert Path(metrics["report_files"]["json"]).name.startswith("data-prefs-")


def test_eval_refusals(cli: Callable[..., Result], dpo_run: Path, tmp_path: Path) -> None:
    assert_user_error(cli("eval", dpo_run, "--zero-shot"), "--zero-shot does not apply")
    assert_user_error(
        cli("eval", dpo_run, "--label-map", "0=negative"),
        "--label-map: reads a classification file", "is a preference run",
    )  # fmt: skip


def test_the_run_answers_as_an_instruct_run(
    cli: Callable[..., Result], dpo_run: Path, tmp_path: Path
) -> None:
    result = cli(
        "generate", dpo_run, "--instruction", "Compute the current ratio.",
        "--input", "Current assets EUR 5.0 mn.", "--max-new-tokens", "4", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    answer = json.loads(result.out)
    assert answer["instruction"] == "Compute the current ratio." and "answer" in answer
    # Served: the instruct routes, the chat template's answer.
    from fastapi.testclient import TestClient

    from finlora.inference import load_run
    from finlora.serve import create_app

    client = TestClient(create_app(load_run(dpo_run)))
    assert client.get("/info").json()["endpoints"] == ["/generate", "/v1/chat/completions"]
    chat = {"messages": [{"role": "user", "content": "Is gold safe?"}], "max_tokens": 4}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    refused = client.post("/predict", json={"texts": ["Profit rose."]})
    assert refused.status_code == 400
    assert refused.json()["detail"] == (
        "this run's task is preference, not classify (use /generate or /v1/chat/completions)"
    )
    out = tmp_path / "gguf"
    result = cli("export", dpo_run, "--format", "gguf", "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out.splitlines()[-1])
    assert report["task"] == "preference" and report["verified"]
    assert report["token_agreement"] == 1.0 and report["n"] == 8
    assert report["gguf_checked"] and report["gguf_agreement"] >= 0.9
    assert f"{dpo_run.name}-f16.gguf" in report["files"]
    gguf = GGUFReader(out / f"{dpo_run.name}-f16.gguf").fields["general.description"]
    assert gguf.contents() == "finlora: LORA merged; preference-tuned, alpaca template"


def test_data_fin_preference_writes_the_packaged_set(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    pairs, kto = tmp_path / "prefs.jsonl", tmp_path / "kto.jsonl"
    result = cli("data", "fin-preference", pairs)
    assert result.code == 0, result.err
    assert result.err.startswith(f"wrote 330 records to {pairs}: ") and "SYNTHETIC" in result.err
    assert len(load_preference(pairs)) == 330
    assert cli("data", "fin-preference", kto, "--kto").code == 0
    records = load_preference(kto)
    assert len(records) == 660 and {r.desirable for r in records} == {True, False}
    assert_user_error(cli("data", "fin-preference", pairs), "exists (use --overwrite")


def test_training_refusals(
    cli: Callable[..., Result], recipe: Path, instruct_run: Path, overrides: list[str],
    pref_file: Path, tmp_path: Path,
) -> None:  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pref_file.read_text() + '{"prompt": "Q?", "completion": "A"}\n', "utf-8")
    output = tmp_path / "run"
    result = cli("train", recipe, "--output", output, *set_args([*overrides, f"data.path={bad}"]))
    assert_user_error(result, f"{bad}:{PAIRS + 1}: 'label' must be true")
    assert not output.exists()
    result = cli("train", "--resume", "--from", instruct_run, "--output", output)
    assert_user_error(result, "--from starts a new run; --resume continues one")
    result = cli("train", recipe, "--from", instruct_run, "--output", output,
                 *set_args([*overrides, "lora.r=8"]))  # fmt: skip
    assert_user_error(result, f"--from {instruct_run}: its lora.r is 4, this config's 8")
