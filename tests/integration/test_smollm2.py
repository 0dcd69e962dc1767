"""Integration tests on the real embedded SmolLM2-135M, on a few dozen FPB sentences.

They use the shared model cache (~/.cache/finlora or $FINLORA_HOME): the first run converts the
GGUF once (~25 s), later runs load in seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from finlora.config import load_config
from finlora.data import load_fpb
from finlora.inference import load_run
from finlora.train import resume_config, train

pytestmark = pytest.mark.integration

FPB_DIR = os.environ.get("FINLORA_FPB_DIR")


@pytest.fixture(scope="module")
def fpb_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 AllAgree sentences, 16 per label, as an FPB-format file (read from the shared data)."""
    if not FPB_DIR:
        pytest.skip("FINLORA_FPB_DIR is not set")
    examples = load_fpb(Path(FPB_DIR), "all")
    picked = []
    for label in ("negative", "neutral", "positive"):
        picked += [e for e in examples if e.label == label][:16]
    path = tmp_path_factory.mktemp("fpb") / "sample.txt"
    path.write_text("".join(f"{e.text}@{e.label}\n" for e in picked), encoding="utf-8")
    return path


def _cfg(data: Path, *extra: str):
    return load_config(
        None,
        [
            f"data.path={data}",
            "data.test_fraction=0.25",
            "data.val_fraction=0.2",
            "train.batch_size=8",
            "train.epochs=2",  # 4 steps an epoch on the sample: the tests take up to 8
            "train.log_every=1",
            "train.learning_rate=5e-4",
            "train.checkpoint_every=3",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trained(real_home: None, fpb_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "smollm2"
    train(_cfg(fpb_sample, "train.max_steps=8"), out, progress_bar=False, log=lambda m: None)
    return out


def test_loss_falls_and_predictions_are_valid_labels(trained: Path) -> None:
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "step"]
    assert len(losses) == 8
    # The untrained model rarely puts a label word after the prompt: the loss starts high.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.5
    loaded = load_run(trained)
    predictions = loaded.predict(
        [
            "Net sales fell 30 % and the company swung to a loss.",
            "The company will publish its results on 5 May.",
        ],
        progress=False,
    )
    for p in predictions:
        assert p.label in {"negative", "neutral", "positive"}
        # Each of the three is rounded to 6 decimals: their sum may be 1.5e-6 off.
        assert abs(sum(p.probabilities.values()) - 1) <= 1.5e-6 + 1e-12


def test_served_predictions_are_the_commands(trained: Path) -> None:
    from fastapi.testclient import TestClient

    from finlora.serve import create_app

    texts = ["Operating profit rose to EUR 13.1 mn.", "The annual meeting is on 5 May."]
    loaded = load_run(trained)
    response = TestClient(create_app(loaded)).post("/predict", json={"texts": texts})
    assert response.status_code == 200
    # The server does not echo the texts back unless asked to ("echo": true).
    expected = [
        {k: v for k, v in p.to_dict().items() if k != "text"}
        for p in loaded.predict(texts, progress=False)
    ]
    assert response.json() == {"predictions": expected}


def test_adapter_changes_the_model(trained: Path) -> None:
    texts = ["Operating profit rose to EUR 13.1 mn from EUR 8.7 mn."]
    tuned = load_run(trained).proba(texts, progress=False)
    base = load_run(trained, zero_shot=True).proba(texts, progress=False)
    assert not torch.allclose(torch.tensor(tuned), torch.tensor(base), atol=1e-3)


def test_run_resumes(real_home: None, fpb_sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    train(_cfg(fpb_sample, "train.max_steps=3"), out, progress_bar=False, log=lambda m: None)
    assert (out / "checkpoints" / "step-0000003").is_dir()
    result = train(
        resume_config(out, ["train.max_steps=5"]),
        out,
        resume=True,
        progress_bar=False,
        log=lambda m: None,
    )
    assert result.steps == 5
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "step"
    ]
    assert steps == [1, 2, 3, 4, 5]


def test_demo_runs_end_to_end_on_the_synthetic_set(
    real_home: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finlora.demo import run_demo

    monkeypatch.delenv("FINLORA_FPB_DIR", raising=False)
    lines: list[str] = []
    metrics = run_demo(tmp_path / "demo", max_steps=3, echo=lines.append, log=lambda m: None)
    text = "\n".join(lines)
    assert "synthetic" in text.lower()
    assert "predictions:" in text
    assert lines[-1].startswith(f"next: finlora predict {tmp_path / 'demo'} ")
    assert 0 <= metrics["accuracy"] <= 1
    assert (tmp_path / "demo" / "eval" / "test_confusion.png").is_file()
