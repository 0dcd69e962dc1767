"""Prediction folds a LoRA/IA3 adapter into the weights (speed.merge_for_inference): the scores
must be those of the adapter model, to float rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from finlora.config import load_config
from finlora.data import synthetic_sentiment
from finlora.inference import load_run
from finlora.train import train

TEXTS = [e.text for e in synthetic_sentiment(8, seed=11)]


def _set_merge(run_dir: Path, merge: bool) -> None:
    path = run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data["speed"]["merge_for_inference"] = merge
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_merged_prediction_matches_adapter(
    method: str, tiny_overrides: list[str], tmp_path: Path
) -> None:
    shared = [o for o in tiny_overrides if not o.startswith("lora.")]
    # A high learning rate so the adapter moves far from its (identity) start.
    cfg = load_config(
        None,
        [*shared, f"method.name={method}", "train.max_steps=3", f"{method}.learning_rate=0.05"],
    )
    run_dir = tmp_path / method
    train(cfg, run_dir, progress_bar=False, log=lambda _: None)

    _set_merge(run_dir, False)
    adapter = load_run(run_dir)
    _set_merge(run_dir, True)
    merged = load_run(run_dir)

    names = [type(m).__name__ for m in merged.model.modules()]
    if method == "prompt":  # virtual tokens: nothing to fold, the model stays a PEFT model
        assert merged.model is not None and "PeftModelForCausalLM" in names
    else:
        assert not any(n.startswith(("Lora", "IA3")) or "Peft" in n for n in names)
    p_adapter = adapter.proba(TEXTS, progress=False)
    p_merged = merged.proba(TEXTS, progress=False)
    assert not np.allclose(p_adapter, load_run(run_dir, zero_shot=True).proba(TEXTS, False))
    np.testing.assert_allclose(p_merged, p_adapter, atol=1e-5)


def test_a_head_untied_for_bf16_merges_quietly(
    tiny_causal_dir: Path, tiny_overrides: list[str]
) -> None:
    """`head_to_dtype` unties SmolLM2's tied head; the config says so, so PEFT's merge for
    prediction does not warn that the embeddings came untied."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finlora.methods import build_method, merged_for_inference
    from finlora.models.device import head_to_dtype

    config = AutoConfig.from_pretrained(tiny_causal_dir)
    config.tie_word_embeddings = True  # as SmolLM2's
    cfg = load_config(None, tiny_overrides)
    model = build_method(AutoModelForCausalLM.from_config(config), cfg, "causal")
    assert head_to_dtype(model, torch.bfloat16)
    assert model.config.tie_word_embeddings is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = merged_for_inference(model)
    assert merged.get_output_embeddings().weight.dtype == torch.bfloat16
