"""Preference runs end to end on the tiny Llama: a few steps of DPO, ORPO and KTO train, save,
reload and evaluate; the first step's loss is the one of a policy equal to its reference; a run
continues an instruct run's adapter (`--from`), which is then its reference, and resumes exactly
even once that run is gone."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finlora.config import RunConfig, load_config
from finlora.errors import FinloraError
from finlora.evaluate import evaluate_run
from finlora.inference import load_run
from finlora.runs import RunDir
from finlora.train import resume_config, train

PAIRS = 40


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 short pairs: a hedged answer against an overconfident one."""
    rows = [
        {
            "prompt": f"Is stock {i} a safe buy?",
            "chosen": "No investment is entirely safe; weigh the risk." if i % 2 else "It depends.",
            "rejected": f"Yes, it will surely rise {i} % this year.",
        }
        for i in range(PAIRS)
    ]
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def instruct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [
        {"instruction": f"Is stock {i} a safe buy?", "output": "It depends."} for i in range(30)
    ]
    path = tmp_path_factory.mktemp("instruct") / "instruct.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pref_cfg(tiny_cfg: Callable[..., RunConfig], pref_file: Path) -> Callable[..., RunConfig]:
    def build(*overrides: str) -> RunConfig:
        return tiny_cfg(
            "task=preference", "data.template=alpaca", f"data.path={pref_file}",
            "data.max_length=160", "train.max_steps=3", "train.epochs=1", "train.batch_size=4",
            "train.learning_rate=0.01", "data.test_fraction=0.1", "data.val_fraction=0.1",
            *overrides,
        )  # fmt: skip

    return build


def steps(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in RunDir(run_dir).read_metrics() if r["kind"] == "step"]


FIRST_LOSS = {"dpo": math.log(2), "kto": 0.5}  # a policy equal to its reference


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_a_short_run_trains_saves_reloads_and_evaluates(
    pref_cfg: Callable[..., RunConfig], tmp_path: Path, objective: str
) -> None:
    out = tmp_path / objective
    result = train(pref_cfg(f"preference.objective={objective}"), out, progress_bar=False,
                   log=quiet)  # fmt: skip
    assert result.steps == 3 and result.best_val_loss is not None
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    if objective in FIRST_LOSS:
        assert rows[0]["loss"] == pytest.approx(FIRST_LOSS[objective], abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]  # a high learning rate: it moves at once
    (epoch,) = [r for r in RunDir(out).read_metrics() if r["kind"] == "epoch"]
    assert {"val_loss", "val_reward_accuracy", "val_reward_margin", "val_logp_accuracy"} <= set(
        epoch
    )
    assert "train_perplexity" not in epoch  # a preference loss has none
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "preference" and manifest["steps"] == 3
    assert not (out / "start_adapter").exists()
    # Reloaded, the run answers as an instruct run does: the same prompt rendering.
    loaded = load_run(out)
    assert loaded.task == "instruct" and loaded.run.task == "preference"
    assert loaded.instruct_codec.template.name == "alpaca"
    metrics = evaluate_run(out, progress=False, max_new_tokens=4)
    assert metrics["task"] == "preference" and metrics["objective"] == objective
    assert metrics["n"] == metrics["pairs"] == 4 and metrics["unpaired"] == 0
    # Trained towards the chosen answers, the run ranks them above the rejected ones by its
    # implicit reward (which is zero for its starting model against itself).
    assert metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] > 0
    assert metrics["chosen_perplexity"] < metrics["start_chosen_perplexity"]
    for key in ("logp_accuracy", "start_logp_accuracy", "logp_accuracy_per_token"):
        assert 0 <= metrics[key] <= 1
    files = {k: Path(v) for k, v in metrics["report_files"].items()}
    assert files["json"] == out / "eval" / "test.json"
    samples = [json.loads(line) for line in files["samples"].read_text().splitlines()]
    assert len(samples) == 4 and {"answer", "start_answer", "chosen", "rejected"} <= set(samples[0])
    records = [json.loads(line) for line in files["records"].read_text().splitlines()]
    assert len(records) == 4 and len(records[0]["reward"]) == 2
    assert "reward accuracy     1.0000" in files["text"].read_text()


def test_kto_reads_unpaired_records_and_pair_objectives_refuse_them(
    pref_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    rows = [{"prompt": f"Is stock {i} safe?", "completion": "It depends." if i % 2 else "Yes!",
             "label": bool(i % 2)} for i in range(40)]  # fmt: skip
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(FinloraError, match=rf"^{path}:1: an unpaired record"):
        train(pref_cfg(f"data.path={path}"), tmp_path / "dpo", progress_bar=False, log=quiet)
    assert not (tmp_path / "dpo").exists()  # refused before anything was written
    out = tmp_path / "kto"
    train(pref_cfg(f"data.path={path}", "preference.objective=kto"), out, progress_bar=False,
          log=quiet)  # fmt: skip
    metrics = evaluate_run(out, progress=False, max_new_tokens=2)
    assert metrics["pairs"] == 0 and metrics["unpaired"] == metrics["n"] == 4
    assert 0 <= metrics["unpaired_reward_accuracy"] <= 1


def test_a_malformed_record_stops_training_before_it_starts(
    pref_cfg: Callable[..., RunConfig], pref_file: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pref_file.read_text() + '{"prompt": "Q?", "chosen": "A"}\n', encoding="utf-8")
    with pytest.raises(FinloraError, match=rf"^{bad}:41: missing 'rejected'$"):
        train(pref_cfg(f"data.path={bad}"), tmp_path / "run", progress_bar=False, log=quiet)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def instruct_run(tiny_cfg: Callable[..., RunConfig], instruct_file: Path, tmp_path: Path) -> Path:
    """A few steps of instruction tuning at a high rate: an adapter far from the base model."""
    cfg = tiny_cfg(
        "task=instruct", "data.template=alpaca", f"data.path={instruct_file}",
        "train.max_steps=3", "train.learning_rate=0.05", "data.max_length=160",
    )  # fmt: skip
    out = tmp_path / "instruct"
    train(cfg, out, progress_bar=False, log=quiet)
    return out


def test_from_an_instruct_run_its_adapter_is_the_reference_and_resume_is_exact(
    pref_cfg: Callable[..., RunConfig],
    instruct_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop_after_checkpoint: Callable[[int], type[Exception]],
) -> None:
    settings = (
        f"method.start_from={instruct_run}",
        "train.max_steps=4",
        "train.checkpoint_every=2",
    )
    whole = tmp_path / "whole"
    train(pref_cfg(*settings), whole, progress_bar=False, log=quiet)
    # The policy starts as the instruct run's adapter and is measured against it: DPO's first
    # loss is log 2 (against the base model it would not be).
    assert steps(whole)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    saved = load_file(str(instruct_run / "adapter" / "adapter_model.safetensors"))
    kept = load_file(str(whole / "start_adapter" / "adapter_model.safetensors"))
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    # Stopped after its step-2 checkpoint, and resumed once the instruct run is gone.
    stop = stop_after_checkpoint(2)
    stopped = tmp_path / "stopped"
    with pytest.raises(stop):
        train(pref_cfg(*settings), stopped, progress_bar=False, log=quiet)
    monkeypatch.undo()
    shutil.rmtree(instruct_run)
    train(resume_config(stopped, []), stopped, resume=True, progress_bar=False, log=quiet)
    for a, b in zip(steps(stopped), steps(whole), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    a = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    # Its eval's starting model is the instruct adapter, read from the run's own copy.
    metrics = evaluate_run(stopped, progress=False, max_new_tokens=2)
    assert metrics["reward_accuracy"] >= 0.5


def test_from_refuses_a_run_it_cannot_continue(
    pref_cfg: Callable[..., RunConfig], instruct_run: Path, tmp_path: Path
) -> None:
    cases = [
        (("lora.r=8",), "its lora.r is 4, this config's 8"),
        (("lora.lora_alpha=16",), "its lora.lora_alpha is 8, this config's 16"),
        (("model.name=smollm2-135m-instruct",), "its base model is"),
    ]
    for overrides, fragment in cases:
        cfg = pref_cfg(f"method.start_from={instruct_run}", *overrides)
        with pytest.raises(FinloraError, match=fragment):
            train(cfg, tmp_path / "run", progress_bar=False, log=quiet)
        assert not (tmp_path / "run").exists()
    cfg = pref_cfg(f"method.start_from={tmp_path / 'nowhere'}")
    with pytest.raises(FinloraError, match="^--from .*nowhere: no such run directory"):
        train(cfg, tmp_path / "run", progress_bar=False, log=quiet)


def test_the_preference_section_belongs_to_its_task() -> None:
    with pytest.raises(FinloraError, match="preference.beta is an option of task preference"):
        load_config(None, ["task=instruct", "preference.beta=0.5"])
    with pytest.raises(FinloraError, match="preference.loss_type is an option of objective dpo"):
        load_config(None, ["task=preference", "preference.objective=kto",
                           "preference.loss_type=ipo"])  # fmt: skip
    with pytest.raises(FinloraError, match=r"preference.label_smoothing must be in \[0, 0.5\)"):
        load_config(None, ["task=preference", "preference.label_smoothing=0.5"])
    with pytest.raises(FinloraError, match="preference.objective must be one of dpo, orpo, kto"):
        load_config(None, ["task=preference", "preference.objective=simpo"])
    cfg = load_config(None, ["task=preference"])
    assert cfg.data.template == "chat" and cfg.preference.objective == "dpo"
    assert "preference" not in load_config(None, []).to_dict()  # other tasks write none


CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_recipes_continue_the_instruct_recipe(objective: str) -> None:
    """`--from` a run of configs/fin-instruct-smollm2-lora.yaml: the same model and adapter."""
    import dataclasses

    recipe = CONFIGS / f"fin-preference-smollm2-{objective}.yaml"
    first = recipe.read_text().splitlines()[0]
    assert first.startswith(f"# finlora train configs/{recipe.name} --from runs/fin-instruct ")
    cfg, instruct = load_config(recipe), load_config(CONFIGS / "fin-instruct-smollm2-lora.yaml")
    assert cfg.task == "preference" and cfg.preference.objective == objective
    assert (cfg.model, cfg.method.name) == (instruct.model, instruct.method.name)
    assert (cfg.data.template, cfg.data.max_length) == (instruct.data.template, 384)
    mine, theirs = dataclasses.asdict(cfg.lora), dataclasses.asdict(instruct.lora)
    assert {k: v for k, v in mine.items() if k != "learning_rate"} == {
        k: v for k, v in theirs.items() if k != "learning_rate"
    }
