"""The training recipe end to end on the tiny models: run directory, loss, resume, reload."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import finlora.train as train_module
from finlora.config import RunConfig, config_from_dict
from finlora.data import FPB_LABELS, synthetic_sentiment
from finlora.inference import load_run
from finlora.methods import build_method
from finlora.models import load_base_model, sha256_file
from finlora.runs import RunDir, SplitRecord
from finlora.scoring import label_loglik, predict_proba
from finlora.train import resume_config, train

TEXTS = [e.text for e in synthetic_sentiment(6, seed=5)]


def quiet(message: str) -> None:
    pass


def run(cfg: RunConfig, output: Path, **kwargs: Any) -> train_module.TrainResult:
    return train(cfg, output, progress_bar=False, log=quiet, **kwargs)


def step_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in RunDir(run_dir).read_metrics() if r["kind"] == "step"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Trainable weights of the newest checkpoint (written at the end of every run)."""
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("step-*"))
    return load_file(str(checkpoint / "trainable.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def test_run_directory(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, fpb_file: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg("train.max_steps=4", "seed=3")
    output = tmp_path / "run"
    result = run(cfg, output)
    assert result.steps == 4 and result.run_dir == output
    assert result.best_epoch == 1

    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    assert (output / "adapter" / "adapter_config.json").is_file()
    assert (output / "tokenizer" / "tokenizer.json").is_file()
    assert (output / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert config_from_dict(yaml.safe_load((output / "config.yaml").read_text())) == cfg

    split = json.loads((output / "split.json").read_text())
    assert split["labels"] == list(FPB_LABELS)
    assert split["files"] == {str(fpb_file): sha256_file(fpb_file)}
    assert split["seed"] == 3 and split["synthetic"] is False
    indices = split["train"] + split["validation"] + split["test"]
    assert sorted(indices) == list(range(60))

    rows = RunDir(output).read_metrics()
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]
    (epoch,) = [r for r in rows if r["kind"] == "epoch"]
    assert epoch["step"] == 4 and epoch["best"] is True
    assert 0 <= epoch["val_accuracy"] <= 1 and np.isfinite(epoch["val_loss"])

    manifest = json.loads((output / "manifest.json").read_text())
    weights = tiny_causal_dir / "model.safetensors"
    assert manifest["base_model"]["sha256"] == {str(weights): sha256_file(weights)}
    assert manifest["base_model"]["kind"] == "causal"
    assert manifest["data"]["files"] == {str(fpb_file): sha256_file(fpb_file)}
    assert manifest["seed"] == 3 and manifest["steps"] == 4
    assert {"python", "torch", "transformers", "peft"} <= manifest["versions"].keys()
    assert "git_commit" in manifest
    assert {"model_load_s", "train_s", "real_tokens"} <= manifest["timings"].keys()
    assert manifest["timings"]["real_tokens"] > 0
    # the process's peak: at least the torch runtime (> 100 MiB), far below this machine's RAM
    assert 100 < manifest["timings"]["peak_rss_mib"] < 16 * 1024
    assert manifest["precision"] == "fp32" and manifest["device"] == "cpu"


def test_training_loss_falls(tiny_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    cfg = tiny_cfg("train.max_steps=30", "train.epochs=10", "train.learning_rate=0.01")
    run(cfg, tmp_path / "run")
    losses = [r["loss"] for r in step_rows(tmp_path / "run")]
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2


def test_same_seed_same_run(tiny_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    cfg = tiny_cfg("train.max_steps=3")
    run(cfg, tmp_path / "a")
    run(tiny_cfg("train.max_steps=3"), tmp_path / "b")
    assert [r["loss"] for r in step_rows(tmp_path / "a")] == [
        r["loss"] for r in step_rows(tmp_path / "b")
    ]
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))


def test_resume_after_a_stop_is_exact(
    tiny_cfg: Callable[..., RunConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop_after_checkpoint: Callable[[int], type[Exception]],
) -> None:
    overrides = ("train.max_steps=6", "train.checkpoint_every=3", "train.learning_rate=0.01")
    run(tiny_cfg(*overrides), tmp_path / "whole")

    # A stop (kill, Ctrl-C) right after the step-3 checkpoint, mid-epoch (5 batches an epoch).
    stop = stop_after_checkpoint(3)
    stopped = tmp_path / "stopped"
    with pytest.raises(stop):
        run(tiny_cfg(*overrides), stopped)
    monkeypatch.undo()
    assert not (stopped / "adapter").exists()
    assert [r["step"] for r in step_rows(stopped)] == [1, 2, 3]

    result = run(resume_config(stopped, []), stopped, resume=True)
    assert result.steps == 6
    assert_same_weights(final_weights(stopped), final_weights(tmp_path / "whole"))
    assert_same_weights(
        load_file(str(stopped / "adapter" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")),
    )
    resumed, whole = step_rows(stopped), step_rows(tmp_path / "whole")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, whole, strict=True):
        assert (a["epoch"], a["lr"]) == (b["epoch"], b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    manifest = json.loads((stopped / "manifest.json").read_text())
    assert manifest["steps"] == 6


def test_resume_extends_a_finished_run_where_it_stopped(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    # A run ended by max_steps mid-epoch, then continued with a larger budget: the continuation
    # takes the rest of the epoch's batches (as the uninterrupted run does), not a new epoch.
    # The weights cannot match the uninterrupted run: max_steps also sets the LR schedule.
    overrides = ("train.checkpoint_every=3", "train.learning_rate=0.01")
    run(tiny_cfg("train.max_steps=6", *overrides), tmp_path / "whole")
    output = tmp_path / "extended"
    run(tiny_cfg("train.max_steps=3", *overrides), output)
    (output / "manifest.json").unlink()
    result = run(resume_config(output, ["train.max_steps=6"]), output, resume=True)
    assert (result.steps, result.steps_now) == (6, 3)
    assert [(r["step"], r["epoch"]) for r in step_rows(output)] == [
        (r["step"], r["epoch"]) for r in step_rows(tmp_path / "whole")
    ]


def test_resume_with_no_steps_left_says_so(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    run(tiny_cfg("train.max_steps=4", "train.checkpoint_every=2"), output)
    lines: list[str] = []
    cfg = resume_config(output, ["train.max_steps=2"])
    result = train(cfg, output, progress_bar=False, log=lines.append, resume=True)
    assert (result.steps, result.steps_now) == (4, 0)
    assert any("step 4 is already at the 2 steps" in line for line in lines), lines


def test_resume_without_checkpoint_or_run(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    from finlora.errors import FinloraError

    with pytest.raises(FinloraError, match="nothing to resume"):
        resume_config(tmp_path / "none", [])
    output = tmp_path / "run"
    run(tiny_cfg("train.max_steps=2"), output)
    for checkpoint in (output / "checkpoints").iterdir():
        for f in checkpoint.iterdir():
            f.unlink()
        checkpoint.rmdir()
    with pytest.raises(FinloraError, match="no checkpoint to resume from"):
        run(resume_config(output, []), output, resume=True)


def test_resume_keeps_what_the_run_learns_from(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    from finlora.errors import FinloraError

    output = tmp_path / "run"
    run(tiny_cfg("train.max_steps=2"), output)
    for item in ("data.path=other.csv", "seed=7", "lora.r=8", "method.name=ia3",
                 "train.learning_rate=0.1", "train.batch_size=4"):  # fmt: skip
        with pytest.raises(FinloraError, match="a resumed run keeps the settings it started"):
            resume_config(output, [item])
    # Data edited in place (same rows, other text) is not what the run started on.
    cfg = resume_config(output, ["train.max_steps=4"])
    original = Path(cfg.data.path).read_text(encoding="utf-8")
    edited = tmp_path / "edited.txt"
    edited.write_text(original.replace("a", "o", 1), encoding="utf-8")
    cfg.data.path = str(edited)
    with pytest.raises(FinloraError, match="no longer gives the split this run started with"):
        run(cfg, output, resume=True)
    # Data that changed under the run (here: one row fewer) no longer gives its split.
    cfg = resume_config(output, ["train.max_steps=4"])
    rows = Path(cfg.data.path).read_text(encoding="utf-8").splitlines()
    changed = tmp_path / "changed.txt"
    changed.write_text("\n".join(rows[1:]) + "\n", encoding="utf-8")
    cfg.data.path = str(changed)
    with pytest.raises(FinloraError, match="no longer gives the split this run started with"):
        run(cfg, output, resume=True)


def test_relative_data_and_model_paths_are_recorded_absolute(
    tiny_cfg: Callable[..., RunConfig],
    tiny_causal_dir: Path,
    fpb_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(fpb_file.parent)
    model = os.path.relpath(tiny_causal_dir, fpb_file.parent)
    output = tmp_path / "run"
    run(tiny_cfg("train.max_steps=1", f"data.path={fpb_file.name}", f"model.name={model}"), output)
    saved = RunDir(output).read_config()
    assert saved.data.path == str(fpb_file) and saved.model.name == str(tiny_causal_dir)
    assert list(SplitRecord.read(RunDir(output).split).fingerprint.files) == [str(fpb_file)]


def test_a_diverged_run_stops_in_one_line_and_leaves_nothing(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    from finlora.errors import FinloraError

    output = tmp_path / "run"
    cfg = tiny_cfg("train.max_steps=6", "train.learning_rate=1e30")
    with pytest.raises(FinloraError, match=r"training diverged: the loss is (nan|inf) at step"):
        run(cfg, output)
    assert not output.exists()


def test_reloaded_run_scores_as_in_memory_model(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, tmp_path: Path
) -> None:
    # One epoch: the saved adapter is the final state, which the final checkpoint also holds.
    cfg = tiny_cfg("train.max_steps=null", "train.epochs=1", "train.learning_rate=0.01")
    output = tmp_path / "run"
    run(cfg, output)

    base = load_base_model(str(tiny_causal_dir))
    model = build_method(base.model, cfg, base.kind)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in final_weights(output).items():
            params[name].copy_(value)
    model.eval()

    loaded = load_run(output)
    expected = predict_proba(model, loaded.codec, TEXTS, progress=False)
    np.testing.assert_allclose(
        loaded.proba(TEXTS, progress=False, calibrate=False), expected, atol=1e-6
    )
    predictions = loaded.predict(TEXTS, progress=False)
    assert [p.label for p in predictions] == [FPB_LABELS[i] for i in expected.argmax(1)]

    # The validation loss train() logged with its in-memory model, recomputed after reloading.
    from finlora.data.prepare import prepare_data

    data = prepare_data(loaded.cfg.data, loaded.cfg.seed)
    val = data.rows("validation")
    prompts = [loaded.codec.encode_text(e.text) for e in val]
    gold = [loaded.labels.index(e.label) for e in val]
    loglik = label_loglik(loaded.model, loaded.codec, prompts)
    val_loss = -loglik[torch.arange(len(gold)), torch.tensor(gold)].sum().item() / len(gold)
    (epoch,) = [r for r in RunDir(output).read_metrics() if r["kind"] == "epoch"]
    assert val_loss == pytest.approx(epoch["val_loss"], abs=1e-5)


def test_zero_shot_load_is_the_base_model(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    run(tiny_cfg("train.max_steps=2", "train.learning_rate=0.05"), output)
    loaded = load_run(output, zero_shot=True)
    base = load_base_model(str(tiny_causal_dir))
    expected = predict_proba(base.model, loaded.codec, TEXTS, progress=False)
    np.testing.assert_allclose(
        loaded.proba(TEXTS, progress=False, calibrate=False), expected, atol=1e-6
    )
    tuned = load_run(output).proba(TEXTS, progress=False)
    assert np.abs(tuned - expected).max() > 1e-4


def test_seq2seq_trains_and_predicts(
    tiny_cfg: Callable[..., RunConfig], tiny_seq2seq_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    result = run(tiny_cfg("train.max_steps=3", model=tiny_seq2seq_dir), output)
    assert result.steps == 3
    losses = [r["loss"] for r in step_rows(output)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["base_model"]["kind"] == "seq2seq"
    predictions = load_run(output).predict(TEXTS, progress=False)
    assert len(predictions) == len(TEXTS)
    for p in predictions:
        assert p.label in FPB_LABELS
        assert list(p.probabilities) == list(FPB_LABELS)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.probabilities[p.label] == max(p.probabilities.values())


def test_training_says_how_many_texts_max_length_cut(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    lines: list[str] = []
    train(tiny_cfg("data.max_length=40", "train.max_steps=1"), tmp_path / "run",
          progress_bar=False, log=lines.append)  # fmt: skip
    notes = [line for line in lines if "longer than data.max_length=40" in line]
    assert [n.split(" of ")[1].split()[1] for n in notes] == ["train", "validation"]
    assert all(n.startswith("data: ") and "raise data.max_length" in n for n in notes)
    lines.clear()
    train(tiny_cfg("train.max_steps=1"), tmp_path / "roomy", progress_bar=False, log=lines.append)
    assert not any("longer than data.max_length" in line for line in lines)


def test_total_steps_counts_a_step_every_grad_accum_batches_and_at_each_epoch_end() -> None:
    from finlora.config import TrainConfig
    from finlora.training.step import total_steps

    tc = TrainConfig(epochs=3, batch_size=8, grad_accum=2)
    assert total_steps(33, tc) == 9  # 5 batches an epoch: steps after batches 2, 4 and 5
    assert total_steps(33, dataclasses.replace(tc, max_steps=4)) == 4
    assert total_steps(33, dataclasses.replace(tc, max_steps=50)) == 9
