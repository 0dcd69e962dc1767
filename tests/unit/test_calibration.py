"""Temperature scaling: fitted on the validation split, stored in the run, applied when scoring;
accuracy unchanged, validation ECE lowered."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from finlora.calibration import HIGH, LOW, calibrated, ece_of, fit_temperature
from finlora.config import RunConfig
from finlora.errors import FinloraError
from finlora.evaluate import evaluate_run
from finlora.inference import load_run
from finlora.runs import Calibration, Run
from finlora.train import train


def _overconfident(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a model right 70% of the time but sure of itself: the temperature must be > 1."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)
    predicted = np.where(rng.random(n) < 0.7, gold, (gold + rng.integers(1, 3, n)) % 3)
    scores = np.full((n, 3), -8.0)
    scores[np.arange(n), predicted] = 0.0
    return scores, gold


def test_fit_lowers_the_nll_and_the_ece_and_keeps_the_argmax() -> None:
    scores, gold = _overconfident()
    t = fit_temperature(scores, gold)
    assert 1.0 < t < HIGH
    before, after = ece_of(scores, gold), ece_of(scores, gold, t)
    assert after < before / 3
    probs = softmax(scores, axis=1)
    assert (calibrated(probs, t).argmax(1) == probs.argmax(1)).all()
    np.testing.assert_allclose(calibrated(probs, t), softmax(scores / t, axis=1), atol=1e-9)
    np.testing.assert_allclose(calibrated(probs, t).sum(1), 1.0)


def test_an_underconfident_model_is_sharpened_within_bounds() -> None:
    gold = np.arange(300) % 3
    scores = np.zeros((300, 3))
    scores[np.arange(300), gold] = 0.05  # always right, barely above the others
    t = fit_temperature(scores, gold)
    assert LOW <= t < 1.0
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    from finlora.config import load_config

    cfg = load_config(None, [*tiny_overrides, "train.max_steps=4"])
    output = tmp_path_factory.mktemp("calibrated") / "run"
    train(cfg, output, progress_bar=False, log=lambda _m: None)
    return output


def test_the_best_epoch_s_temperature_is_stored_and_applied(calibrated_run: Path) -> None:
    run = Run.open(calibrated_run)
    calibration = run.calibration()
    assert calibration is not None and LOW <= calibration.temperature <= HIGH
    epochs = [r for r in run.dir.read_metrics() if r["kind"] == "epoch"]
    best = [r for r in epochs if r.get("best")][-1]
    assert calibration.temperature == best["val_temperature"]
    assert calibration.val_ece_calibrated <= calibration.val_ece + 1e-9
    loaded = load_run(calibrated_run)
    texts = ["Net sales fell 12 % to EUR 3.1 mn.", "Operating profit rose to EUR 13.1 mn."]
    raw = loaded.proba(texts, progress=False, calibrate=False)
    np.testing.assert_allclose(
        loaded.proba(texts, progress=False), calibrated(raw, calibration.temperature)
    )
    assert load_run(calibrated_run, zero_shot=True).temperature == 1.0


def test_eval_reports_ece_before_and_after_with_the_same_accuracy(calibrated_run: Path) -> None:
    metrics = evaluate_run(calibrated_run, progress=False)
    temperature = Run.open(calibrated_run).calibration().temperature  # type: ignore[union-attr]
    assert metrics["temperature"] == temperature
    assert "ece_uncalibrated" in metrics
    text = Path(metrics["report_files"]["text"]).read_text()
    if temperature != 1.0:
        assert "ECE before" in text
    # The argmax, so accuracy, does not depend on the temperature.
    path = calibrated_run / "calibration.json"
    saved = path.read_text()
    try:
        path.unlink()
        assert evaluate_run(calibrated_run, progress=False)["accuracy"] == metrics["accuracy"]
    finally:
        path.write_text(saved)


def test_a_malformed_calibration_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(
        json.dumps({"temperature": -1, "epoch": 1, "val_ece": 0, "val_ece_calibrated": 0})
    )
    with pytest.raises(FinloraError, match="no positive temperature"):
        Calibration.read(path)


def test_an_instruct_or_unvalidated_run_has_none(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    cfg = tiny_cfg("train.max_steps=2", "data.val_fraction=0")
    train(cfg, tmp_path / "run", progress_bar=False, log=lambda _m: None)
    assert Run.open(tmp_path / "run").calibration() is None
    assert load_run(tmp_path / "run").temperature == 1.0
