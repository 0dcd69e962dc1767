"""Bottleneck adapters (method adapter) on the tiny Llama, T5 and BERT: where they sit, that the
model starts as the base, that a saved run reloads to the same logits, that the speed paths
leave them alone, and that export refuses them in one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finlora.config import RunConfig, load_config
from finlora.errors import FinloraError
from finlora.export import ExportOptions, export_run
from finlora.methods import build_method, load_adapter, merged_for_inference, save_adapter
from finlora.methods.adapter import Bottleneck
from finlora.models import load_base_model
from finlora.models.fast.fused_decoder import fused_decoders
from finlora.runs import RunDir
from finlora.train import train


@pytest.fixture
def model_dirs(
    tiny_causal_dir: Path, tiny_seq2seq_dir: Path, tiny_encoder_dir: Path
) -> dict[str, Path]:
    return {"causal": tiny_causal_dir, "seq2seq": tiny_seq2seq_dir, "encoder": tiny_encoder_dir}


@pytest.fixture
def adapter_cfg(tiny_overrides: list[str]) -> Callable[..., RunConfig]:
    """A tiny config for method adapter; extra overrides win."""

    def build(*extra: str) -> RunConfig:
        shared = [o for o in tiny_overrides if not o.startswith("lora.")]
        return load_config(None, [*shared, "method.name=adapter", *extra])

    return build


def _base(directory: Path, kind: str) -> Any:
    torch.manual_seed(0)  # an encoder classifier's new head is drawn as it loads
    return load_base_model(str(directory), kind=kind, labels=["a", "b", "c"]).model.eval()


def _logits(model: Any, kind: str) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    extra = {"decoder_input_ids": ids[:, :3]} if kind == "seq2seq" else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


def _adapters(model: Any) -> dict[str, Bottleneck]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Bottleneck)}


@pytest.mark.parametrize(
    ("kind", "placement", "expected"),
    [
        ("causal", "houlsby", ["model.layers.0.attention_adapter", "model.layers.0.mlp_adapter",
                               "model.layers.1.attention_adapter", "model.layers.1.mlp_adapter"]),
        ("causal", "pfeiffer", ["model.layers.0.mlp_adapter", "model.layers.1.mlp_adapter"]),
        # T5: both stacks' blocks; BERT: each layer, the classifier's head beside them.
        ("seq2seq", "pfeiffer", ["encoder.block.0.mlp_adapter", "encoder.block.1.mlp_adapter",
                                 "decoder.block.0.mlp_adapter", "decoder.block.1.mlp_adapter"]),
        ("encoder", "houlsby", ["bert.encoder.layer.0.attention_adapter",
                                "bert.encoder.layer.0.mlp_adapter",
                                "bert.encoder.layer.1.attention_adapter",
                                "bert.encoder.layer.1.mlp_adapter"]),
    ],
)  # fmt: skip
def test_adapters_sit_where_the_placement_says_and_start_as_the_base(
    kind: str,
    placement: str,
    expected: list[str],
    adapter_cfg: Callable[..., RunConfig],
    model_dirs: dict[str, Path],
) -> None:
    before = _logits(_base(model_dirs[kind], kind), kind)
    cfg = adapter_cfg(f"adapter.placement={placement}")
    model = build_method(_base(model_dirs[kind], kind), cfg, kind)
    assert sorted(_adapters(model)) == sorted(expected)
    # up starts at zero: exactly the base model's logits.
    assert torch.equal(_logits(model, kind), before)
    trainable = {n.split(".adapter_")[0] for n, p in model.named_parameters() if p.requires_grad}
    heads = {"classifier"} if kind == "encoder" else set()
    assert {t.removesuffix(".weight").removesuffix(".bias") for t in trainable} == {
        *expected,
        *heads,
    }


def test_the_bottleneck_follows_the_options(
    adapter_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    model = build_method(
        _base(tiny_causal_dir, "causal"),
        adapter_cfg("adapter.reduction_factor=8", "adapter.non_linearity=tanh"),
        "causal",
    )
    adapter = model.model.layers[0].mlp_adapter
    assert adapter.adapter_down.weight.shape == (4, 32)  # hidden 32 / 8
    assert adapter.adapter_up.weight.shape == (32, 4)
    assert isinstance(adapter.non_linearity, torch.nn.Tanh)
    # Never narrower than one unit, whatever the factor.
    wide = adapter_cfg("adapter.reduction_factor=64")
    model = build_method(_base(tiny_causal_dir, "causal"), wide, "causal")
    assert model.model.layers[0].mlp_adapter.adapter_down.out_features == 1


@pytest.mark.parametrize("kind", ["causal", "seq2seq", "encoder"])
def test_saved_adapters_reload_to_the_same_logits(
    kind: str, adapter_cfg: Callable[..., RunConfig], model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = adapter_cfg()
    model = build_method(_base(model_dirs[kind], kind), cfg, kind)
    base_logits = _logits(_base(model_dirs[kind], kind), kind)
    with torch.no_grad():  # as if trained: every adapter (and head) weight moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    trained = _logits(model, kind)
    assert not torch.allclose(trained, base_logits)
    save_adapter(model, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "finlora_method.json",
        "trainable.safetensors",
    ]
    loaded = load_adapter(_base(model_dirs[kind], kind), cfg, kind, tmp_path)
    assert torch.equal(_logits(loaded, kind), trained)
    # Nothing to fold into the weights: scoring keeps the adapters.
    assert merged_for_inference(loaded) is loaded


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    shared = [o for o in tiny_overrides if not o.startswith("lora.")]
    cfg = load_config(None, [*shared, "method.name=adapter", "train.max_steps=2"])
    output = tmp_path_factory.mktemp("adapter") / "run"
    train(cfg, output, progress_bar=False, log=lambda _m: None)
    return output


def test_export_refuses_bottleneck_adapters_in_one_line(adapter_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FinloraError) as err:
        export_run(adapter_run, ExportOptions("hf", out, verify_n=None))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{adapter_run}: bottleneck adapters cannot be merged")
    assert not out.exists()


def test_speed_switches_leave_the_adapters_alone(
    adapter_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, tmp_path: Path
) -> None:
    """The fused decoder layer would compute attention and MLP without calling them (and so
    without their hooks): it must not take a layer with adapters. Training with every speed
    switch on gives the losses of training with all off."""
    model = build_method(_base(tiny_causal_dir, "causal"), adapter_cfg(), "causal")
    assert fused_decoders(model) == 0
    switches = ("fused_lora", "fused_decoder", "lean_mlp", "lean_attention")
    losses = {}
    for on in (True, False):
        flags = [f"speed.{s}={str(on).lower()}" for s in switches]
        output = tmp_path / f"run-{on}"
        cfg = adapter_cfg("train.max_steps=3", "adapter.learning_rate=0.01", *flags)
        train(cfg, output, progress_bar=False, log=lambda _m: None)
        losses[on] = [r["loss"] for r in RunDir(output).read_metrics() if r["kind"] == "step"]
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["method"] == "adapter"
    np.testing.assert_allclose(losses[True], losses[False], rtol=0, atol=1e-6)
    assert losses[True][-1] != losses[True][0]
