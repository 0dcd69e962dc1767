"""model.quantize (QLoRA through bitsandbytes) on the tiny Llama: a LoRA trains over 4- and
8-bit base weights on the CPU, reloads to the model it trained, merges into the dequantized
base and exports; what cannot train quantized is refused in one line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bitsandbytes as bnb  # the quant extra; CI installs it, so no skip
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import finlora.train as train_module
from finlora.config import RunConfig, load_config
from finlora.data import synthetic_sentiment
from finlora.errors import FinloraError
from finlora.export import ExportOptions, export_run
from finlora.inference import load_run
from finlora.methods import build_method, merged_for_inference
from finlora.models import load_base_model
from finlora.models import quantize as quant
from finlora.runs import RunDir
from finlora.scoring import predict_proba

TEXTS = [e.text for e in synthetic_sentiment(6, seed=5)]
LINEAR_LAYERS = 14  # 7 projections in each of the tiny Llama's 2 layers


def quiet(message: str) -> None:
    pass


@pytest.fixture
def trained_probs(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Probabilities of TEXTS from the in-memory model each time train() keeps the best adapter,
    and how many of its layers were quantized."""
    seen: dict[str, Any] = {}
    original = train_module._end_epoch

    def end_epoch(model: Any, s: Any, *rest: Any) -> dict[str, Any]:
        row = original(model, s, *rest)
        if row.get("best"):
            seen["probs"] = predict_proba(model, s.codec, TEXTS, progress=False)
            seen["quantized"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
            model.train()
        return row

    monkeypatch.setattr(train_module, "_end_epoch", end_epoch)
    yield seen


def _losses(output: Path) -> list[float]:
    return [r["loss"] for r in RunDir(output).read_metrics() if r["kind"] == "step"]


METHOD_OPTIONS = {
    "lora": [],
    "adalora": [
        "method.name=adalora",
        "adalora.init_r=4",
        "adalora.target_r=2",
        "adalora.learning_rate=null",
    ],
}


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_qlora_trains_reloads_merges_and_exports(
    method: str,
    tiny_overrides: list[str],
    trained_probs: dict[str, Any],
    tmp_path: Path,
) -> None:
    output = tmp_path / "run"
    shared = [o for o in tiny_overrides if method == "lora" or not o.startswith("lora.")]
    # 6 steps over 2 epochs: the validation between them runs the quantized layers in eval mode.
    steps = ["train.learning_rate=0.01", "train.max_steps=6"]
    options = ["model.quantize=4bit", *steps, *METHOD_OPTIONS[method]]
    cfg = load_config(None, [*shared, *options])
    train_module.train(cfg, output, progress_bar=False, log=quiet)
    losses = _losses(output)
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2])
    assert trained_probs["quantized"] == LINEAR_LAYERS

    unmerged = load_run(output, speed=["speed.merge_for_inference=false"])
    assert unmerged.cfg.model.quantize == "4bit" and quant.is_quantized(unmerged.model)
    probs = unmerged.proba(TEXTS, progress=False, calibrate=False)
    np.testing.assert_allclose(probs, trained_probs["probs"], rtol=0, atol=1e-6)

    merged = load_run(output)  # merge_for_inference: into the dequantized fp32 base
    assert not quant.is_quantized(merged.model)
    assert all(p.dtype == torch.float32 for p in merged.model.parameters())
    probs = merged.proba(TEXTS, progress=False, calibrate=False)
    np.testing.assert_allclose(probs, trained_probs["probs"], rtol=0, atol=1e-6)

    base = load_run(output, zero_shot=True).proba(TEXTS, progress=False, calibrate=False)
    assert np.abs(base - trained_probs["probs"]).max() > 1e-3  # the adapter did train

    result = export_run(output, ExportOptions("hf", tmp_path / "hf", verify_n=None))
    assert result.verified and result.verification.label_agreement == 1.0
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or "base_layer" in k]
    assert {t.dtype for t in weights.values()} == {torch.float32}


def _quantized_lora(tiny_cfg: Callable[..., RunConfig], directory: Path, mode: str) -> Any:
    base = load_base_model(str(directory), quantize=mode)
    cfg = tiny_cfg(f"model.quantize={mode}")
    return build_method(quant.prepare_for_training(base.model, mode), cfg, "causal")


def test_merge_folds_the_update_into_the_dequantized_weights(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    model = _quantized_lora(tiny_cfg, tiny_causal_dir, "4bit").eval()
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    w_dq = bnb.functional.dequantize_4bit(
        layer.base_layer.weight, layer.base_layer.weight.quant_state
    )
    delta = layer.get_delta_weight("default")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        quantized = model(input_ids=ids).logits
    merged = merged_for_inference(model)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and not quant.is_quantized(merged)
    torch.testing.assert_close(q_proj.weight, w_dq + delta, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, quantized, atol=1e-5, rtol=0)


def test_an_8bit_merge_computes_as_the_layers_train(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    """8-bit layers train on their dequantized weights (fp32 activations) on a CPU and score
    with int8 activations; the merge gives the function that trained."""
    model = _quantized_lora(tiny_cfg, tiny_causal_dir, "8bit")
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == LINEAR_LAYERS
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
        trained = model.train()(input_ids=ids).logits
        scored = model.eval()(input_ids=ids).logits
        merged = merged_for_inference(model)
        assert not quant.is_quantized(merged)
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, atol=1e-5, rtol=0)
    assert (scored - trained).abs().max() > 1e-4  # int8 activations: why cpu refuses 8bit


def _layer0_grads(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return model.get_submodule(
        "base_model.model.model.layers.0.self_attn.q_proj"
    ).lora_A.default.weight.grad.clone()


def test_a_scoring_pass_leaves_the_4bit_gradients_as_they_were(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 kernel without
    a backward at the first eval-mode pass: the gradients below it would then be wrong."""
    model = _quantized_lora(tiny_cfg, tiny_causal_dir, "4bit")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    before = _layer0_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    torch.testing.assert_close(_layer0_grads(model, ids), before, atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.name=full"], "trains lora or adalora adapters only, not method full"),
        (["method.name=prefix"], "not method prefix"),
        (["lora.init=pissa"], "lora.init=pissa moves part of each base weight"),
        (["model.quantize=8bit"], "8bit trains on cuda, not cpu .*int8 activations"),
    ],
)
def test_refused_before_the_data_is_read(
    overrides: list[str],
    message: str,
    tiny_overrides: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_data(cfg: RunConfig) -> None:
        raise AssertionError("the data was read")

    monkeypatch.setattr(train_module, "_setup_data", no_data)
    shared = [o for o in tiny_overrides if not o.startswith("lora.")]
    cfg = load_config(None, [*shared, "model.quantize=4bit", *overrides])
    with pytest.raises(FinloraError, match=message):
        train_module.train(cfg, tmp_path / "run", progress_bar=False, log=quiet)


def test_refusals_name_what_is_supported(
    tiny_encoder_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FinloraError, match="=4bit trains on cpu or cuda, not mps"):
        quant.check_quantize("4bit", "lora", "mps")
    quant.check_quantize("8bit", "adalora", "cuda")
    with pytest.raises(FinloraError, match="causal language models only"):
        load_base_model(str(tiny_encoder_dir), labels=["a", "b"], quantize="4bit")
    quant.check_quantize(None, "full", "mps")  # no quantization: nothing to refuse
    monkeypatch.setattr(quant.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FinloraError, match=r"needs bitsandbytes: pip install 'finlora\[quant\]'"):
        quant.check_quantize("4bit", "lora", "cpu")


def test_config_takes_null_4bit_or_8bit(tiny_cfg: Callable[..., RunConfig]) -> None:
    assert tiny_cfg().model.quantize is None
    assert tiny_cfg("model.quantize=4bit").model.quantize == "4bit"
    with pytest.raises(
        FinloraError, match=r"model.quantize must be one of 4bit, 8bit \(got '3bit'\)"
    ):
        tiny_cfg("model.quantize=3bit")
