"""NEFTune (`train.neftune_alpha`): uniform noise of alpha/sqrt(L·d) on the input embeddings in
training mode only, gone after the training loop, and never in validation or the saved run."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from finlora.config import RunConfig
from finlora.errors import FinloraError
from finlora.methods import build_method
from finlora.models import Placement, load_base_model
from finlora.runs import RunDir
from finlora.scoring import unwrap
from finlora.tasks import codec_for
from finlora.train import train
from finlora.training.neftune import noisy_embeddings
from finlora.training.validation import validate

ALPHA = 5.0
CPU = torch.device("cpu")


@pytest.fixture
def model(tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path) -> Any:
    base = load_base_model(str(tiny_causal_dir), attention="eager")
    torch.manual_seed(0)
    return build_method(base.model, tiny_cfg(), base.kind)


def _embedded(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return unwrap(model).get_input_embeddings()(ids)  # (B, T, d)


IDS = torch.arange(4 * 16).remainder(300).view(4, 16) + 3  # (B, T) = (4, 16)


def test_noise_in_training_mode_only_at_the_papers_scale(model: Any) -> None:
    clean = _embedded(model, IDS).detach()
    d = clean.size(-1)
    bound = ALPHA / math.sqrt(IDS.size(1) * d)  # alpha / sqrt(L·d), L the row's width
    torch.manual_seed(1)
    with noisy_embeddings(model, ALPHA):
        model.train()
        noise = (_embedded(model, IDS) - clean).detach()
        model.eval()
        assert torch.equal(_embedded(model, IDS), clean)
    assert noise.abs().max() <= bound * (1 + 1e-5)
    # 2,048 draws uniform on [-bound, bound]: the largest near the bound, mean 0, std bound/√3.
    assert noise.abs().max() > 0.99 * bound
    assert abs(float(noise.mean())) < 0.05 * bound
    assert float(noise.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_no_noise_without_alpha_nor_after_the_block(model: Any) -> None:
    clean = _embedded(model, IDS).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with noisy_embeddings(model, None):
        assert torch.equal(_embedded(model, IDS), clean)
    with noisy_embeddings(model, ALPHA):
        assert not torch.equal(_embedded(model, IDS), clean)
        assert model.state_dict().keys() == state.keys()  # a hook, not a weight
    assert torch.equal(_embedded(model, IDS), clean)
    embeddings = unwrap(model).get_input_embeddings()
    assert not hasattr(embeddings, "neftune_noise_alpha") and not embeddings._forward_hooks


def test_validation_reads_clean_embeddings(
    tiny_cfg: Callable[..., RunConfig], model: Any, tiny_causal_dir: Path
) -> None:
    from finlora.data.instruct import alpaca_record

    cfg = tiny_cfg("task=instruct", "data.template=alpaca")
    codec = codec_for(
        "instruct", load_base_model(str(tiny_causal_dir)).tokenizer, cfg.data, [], "causal"
    )
    records = [alpaca_record("What is EBIT?", "Operating profit."), alpaca_record("P/E?", "12.")]
    features = [codec.encode(r) for r in records]
    placement = Placement(CPU, None, "eager")
    model.train()
    clean = validate(model, codec, features, cfg.speed, placement)
    with noisy_embeddings(model, ALPHA):
        assert validate(model, codec, features, cfg.speed, placement) == clean
        assert model.training  # validation hands the model back in training mode, noisy again
        noisy = _embedded(model, IDS)
        assert not torch.equal(noisy, _embedded(model.eval(), IDS))


def test_a_run_trains_with_noise_and_saves_none(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    from safetensors import safe_open

    losses, tensors = [], []
    for alpha in ("null", "5"):
        run = tmp_path / f"run-{alpha}"
        cfg = tiny_cfg(f"train.neftune_alpha={alpha}", "train.max_steps=2")
        train(cfg, run, progress_bar=False, log=lambda _: None)
        losses.append([r["loss"] for r in RunDir(run).read_metrics() if r["kind"] == "step"])
        with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
            tensors.append(sorted(f.keys()))
    plain, noisy = losses
    assert len(plain) == len(noisy) == 2
    assert plain[0] != noisy[0]  # the same weights and batch, read through noisy embeddings
    assert tensors[0] == tensors[1]  # the adapter's tensors, nothing of the noise


@pytest.mark.parametrize("alpha", ["0", "-1"])
def test_alpha_must_be_positive(tiny_cfg: Callable[..., RunConfig], alpha: str) -> None:
    with pytest.raises(FinloraError, match="train.neftune_alpha must be positive or null"):
        tiny_cfg(f"train.neftune_alpha={alpha}")
