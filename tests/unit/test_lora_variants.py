"""LoRA's variants (DoRA, rsLoRA, PiSSA and OLoRA starts, LoRA+) and AdaLoRA on the tiny
Llama: each trains, saves and reloads to the model it trained, merged or not, exports merged,
keeps the fused speed paths out of its way where it changes the layer, and is a row of its own
in `finlora compare`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import finlora.train as train_module
from finlora.compare import compare, parse_methods, plan
from finlora.config import RunConfig, load_config
from finlora.data import synthetic_sentiment
from finlora.errors import FinloraError
from finlora.export import ExportOptions, export_run
from finlora.inference import load_run
from finlora.methods import build_method, save_adapter, training_hooks
from finlora.methods.adalora import _orthogonal_penalty
from finlora.models import load_base_model
from finlora.models.fast.fused_lora import fuse_lora_layers
from finlora.runs import RunDir
from finlora.scoring import predict_proba

TEXTS = [e.text for e in synthetic_sentiment(6, seed=5)]
# The tiny runs train at train.learning_rate, as they did before AdaLoRA had a rate of its own.
ADALORA = [
    "method.name=adalora",
    "adalora.init_r=4",
    "adalora.target_r=2",
    "adalora.learning_rate=null",
]
VARIANTS = {
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "pissa": ["lora.init=pissa"],
    "olora": ["lora.init=olora"],
    "loraplus": ["lora.loraplus_lr_ratio=16"],
    "dora+pissa": ["lora.use_dora=true", "lora.init=pissa"],
    "adalora": ADALORA,
}
SPEED_SWITCHES = ("fused_lora", "fused_decoder", "lean_mlp", "lean_attention")


def quiet(message: str) -> None:
    pass


@pytest.fixture
def variant_cfg(tiny_overrides: list[str]) -> Callable[..., RunConfig]:
    """A tiny run of `variant` (VARIANTS), trained hard enough (lr 0.01) to move the scores."""

    def build(variant: str, *extra: str) -> RunConfig:
        options = VARIANTS[variant]
        shared = [o for o in tiny_overrides if not (o.startswith("lora.") and options == ADALORA)]
        return load_config(
            None, [*shared, "train.max_steps=3", "train.learning_rate=0.01", *options, *extra]
        )

    return build


@pytest.fixture
def saved_probs(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, np.ndarray]]:
    """Probabilities of TEXTS from the in-memory model, each time train() saves the adapter."""
    seen: dict[str, np.ndarray] = {}
    original = train_module._end_epoch

    def end_epoch(model: Any, s: Any, *rest: Any) -> dict[str, Any]:
        row = original(model, s, *rest)
        if row.get("best"):
            seen["probs"] = predict_proba(model, s.codec, TEXTS, progress=False)
            model.train()
        return row

    monkeypatch.setattr(train_module, "_end_epoch", end_epoch)
    yield seen


def _losses(output: Path) -> list[float]:
    return [r["loss"] for r in RunDir(output).read_metrics() if r["kind"] == "step"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_reloads_to_the_model_it_trained(
    variant: str,
    variant_cfg: Callable[..., RunConfig],
    saved_probs: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    output = tmp_path / "run"
    train_module.train(variant_cfg(variant), output, progress_bar=False, log=quiet)
    assert len(_losses(output)) == 3
    for merge in ("true", "false"):  # folded into the weights (PEFT's merge), and as adapters
        loaded = load_run(output, speed=[f"speed.merge_for_inference={merge}"])
        probs = loaded.proba(TEXTS, progress=False, calibrate=False)
        # PiSSA and OLoRA reload as W + s·[B, -B0]·[A; A0] where training ran W_res + s·B·A:
        # the same function summed in another order, equal to fp32 rounding like the rest.
        np.testing.assert_allclose(probs, saved_probs["probs"], rtol=0, atol=1e-6)
    base = load_run(output, zero_shot=True).proba(TEXTS, progress=False, calibrate=False)
    assert np.abs(base - saved_probs["probs"]).max() > 1e-4  # the variant did train


def test_each_variant_reaches_peft(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    def built(*overrides: str) -> Any:
        base = load_base_model(str(tiny_causal_dir))
        return build_method(base.model, tiny_cfg(*overrides), "causal")

    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    dora = built("lora.use_dora=true").get_submodule(q_proj)
    assert "default" in dora.lora_variant and "default" in dora.lora_magnitude_vector
    # rsLoRA: lora_alpha / sqrt(r) = 8 / 2, not 8 / 4.
    assert built("lora.use_rslora=true").get_submodule(q_proj).scaling["default"] == 4.0
    assert built().get_submodule(q_proj).scaling["default"] == 2.0
    base_weight = load_base_model(str(tiny_causal_dir)).model.model.layers[0].self_attn.q_proj
    for init in ("pissa", "olora"):
        layer = built(f"lora.init={init}").get_submodule(q_proj)
        # The top of W moved into B0·A0: W_res + s·B0·A0 = W, and W_res != W.
        delta = (
            layer.scaling["default"]
            * layer.lora_B["default"].weight
            @ layer.lora_A["default"].weight
        )
        torch.testing.assert_close(layer.base_layer.weight + delta, base_weight.weight)
        assert not torch.allclose(layer.base_layer.weight, base_weight.weight)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_is_saved_as_a_plain_lora_on_the_untouched_base(
    rslora: bool, tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg("lora.init=pissa", f"lora.use_rslora={str(rslora).lower()}")
    model = build_method(load_base_model(str(tiny_causal_dir)).model, cfg, "causal").eval()
    with torch.no_grad():  # as if trained
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_adapter(model, cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    assert config["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if rslora else 2))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[name].shape == (8, 32)
    # Plain PEFT on the base weights as shipped gives the trained model.
    plain = PeftModel.from_pretrained(load_base_model(str(tiny_causal_dir)).model, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, trained, atol=1e-5, rtol=0)


def test_fused_lora_uses_peft_scaling_and_steps_aside_for_dora(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    for overrides in (["lora.use_rslora=true"], ["lora.use_dora=true"]):
        model = build_method(
            load_base_model(str(tiny_causal_dir)).model, tiny_cfg(*overrides), "causal"
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
            plain = model(input_ids=ids).logits
            assert fuse_lora_layers(model) == 14
            torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["dora", "adalora"])
def test_speed_switches_give_the_same_run(
    variant: str, variant_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    """DoRA and AdaLoRA's SVD layers are not the layers the fused paths compute: those fall back
    to PEFT's, so training and scoring match a run with every speed switch off."""
    losses, probs = {}, {}
    for on in ("true", "false"):
        output = tmp_path / f"run-{on}"
        flags = [f"speed.{s}={on}" for s in SPEED_SWITCHES]
        train_module.train(variant_cfg(variant, *flags), output, progress_bar=False, log=quiet)
        losses[on] = _losses(output)
        probs[on] = load_run(output).proba(TEXTS, progress=False, calibrate=False)
    np.testing.assert_allclose(losses["true"], losses["false"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(probs["true"], probs["false"], rtol=0, atol=1e-6)


def test_loraplus_trains_b_at_ratio_times_the_rate(
    tiny_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = tiny_cfg("lora.loraplus_lr_ratio=16", "train.learning_rate=0.001")
    model = build_method(load_base_model(str(tiny_causal_dir)).model, cfg, "causal")
    optimizer = training_hooks(cfg).optimizer(model, cfg)
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {rate[id(p)] for n, p in named if "lora_A" in n} == {0.001}
    assert {rate[id(p)] for n, p in named if "lora_B" in n} == {0.016}
    assert len(rate) == len(named)
    # Without the ratio: one rate, AdamW as for every method.
    plain = training_hooks(tiny_cfg()).optimizer(model, tiny_cfg())
    assert [g["lr"] for g in plain.param_groups] == [tiny_cfg().learning_rate]


def test_adalora_spends_its_rank_budget_over_the_run(
    variant_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    train_module.train(variant_cfg("adalora"), output, progress_bar=False, log=quiet)
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    # 3 steps: tinit 0.1 and tfinal 0.2 of them round to 0 and 1.
    assert (config["total_step"], config["tinit"], config["tfinal"]) == (3, 0, 1)
    kept = {k: sum(v) for k, v in config["rank_pattern"].items()}
    assert len(kept) == 14 and sum(kept.values()) == 2 * 14  # target_r on average
    tensors = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    for name, rank in kept.items():
        prefix = "base_model.model." + name.removesuffix(".lora_E")
        assert tensors[f"{prefix}.lora_E"].shape == (rank, 1)
        assert tensors[f"{prefix}.lora_A"].shape[0] == tensors[f"{prefix}.lora_B"].shape[1] == rank


def test_adalora_needs_steps_for_its_budget_to_fall(
    variant_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    with pytest.raises(FinloraError) as err:
        train_module.train(
            variant_cfg("adalora", "train.max_steps=1"), output, progress_bar=False, log=quiet
        )
    assert str(err.value).startswith("adalora: a run of 1 optimizer steps leaves no step")
    assert not output.exists()  # refused before the run directory was made
    with pytest.raises(FinloraError, match="adalora.target_r must be below adalora.init_r=4"):
        variant_cfg("adalora", "adalora.target_r=4")


def test_adalora_penalty_is_peft_orthogonal_regularisation(
    variant_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = variant_cfg("adalora")
    model = build_method(load_base_model(str(tiny_causal_dir)).model, cfg, "causal")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    plain = model(input_ids=ids).logits
    cross_entropy = torch.nn.functional.cross_entropy(plain[0, :-1], ids[0, 1:])
    with_penalty = model(input_ids=ids, labels=ids).loss  # PEFT adds it to a labelled loss
    penalty = _orthogonal_penalty(model)
    assert penalty is not None and penalty.item() > 0
    torch.testing.assert_close(with_penalty, cross_entropy + penalty)
    model.peft_config["default"].orth_reg_weight = 0.0
    assert _orthogonal_penalty(model) is None


def test_adalora_resumes_to_the_same_run(
    variant_cfg: Callable[..., RunConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop_after_checkpoint: Callable[[int], type[Exception]],
) -> None:
    """The allocator's scores and the rank pattern are checkpointed with the weights: a run
    stopped after its step-3 checkpoint and resumed ends as the uninterrupted one."""
    overrides = ("train.max_steps=6", "train.checkpoint_every=3")
    train_module.train(
        variant_cfg("adalora", *overrides), tmp_path / "whole", progress_bar=False, log=quiet
    )
    stop = stop_after_checkpoint(3)
    stopped = tmp_path / "stopped"
    with pytest.raises(stop):
        train_module.train(
            variant_cfg("adalora", *overrides), stopped, progress_bar=False, log=quiet
        )
    monkeypatch.undo()
    assert (stopped / "checkpoints" / "step-0000003" / "method_state.safetensors").is_file()
    cfg = train_module.resume_config(stopped, [])
    train_module.train(cfg, stopped, resume=True, progress_bar=False, log=quiet)
    np.testing.assert_allclose(_losses(stopped), _losses(tmp_path / "whole"), rtol=0, atol=1e-6)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        a, b = stopped / "adapter" / name, tmp_path / "whole" / "adapter" / name
        assert a.read_bytes() == b.read_bytes(), name


@pytest.mark.parametrize("variant", ["dora", "pissa", "adalora"])
def test_variant_exports_merged(
    variant: str, variant_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    train_module.train(variant_cfg(variant), output, progress_bar=False, log=quiet)
    result = export_run(output, ExportOptions("hf", tmp_path / "hf", verify_n=None))
    assert result.verified and result.verification.label_agreement == 1.0
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or "base_layer" in k]


def test_compare_rows_are_labelled_by_variant(tiny_overrides: list[str]) -> None:
    items = parse_methods("lora, lora[use_dora=true], lora[init=pissa,r=8],adalora")
    assert items == ["lora", "lora[use_dora=true]", "lora[init=pissa,r=8]", "adalora"]
    runs = plan(None, tiny_overrides, items, 1)
    assert [r.label for r in runs] == items
    assert runs[1].cfg.lora.use_dora and not runs[0].cfg.lora.use_dora
    assert (runs[2].cfg.lora.init, runs[2].cfg.lora.r) == ("pissa", 8)
    # A variant switch set for every lora row names the row.
    runs = plan(None, [*tiny_overrides, "lora.use_rslora=true"], ["lora", "lora[r=8]"], 2)
    assert [r.label for r in runs] == ["lora[use_rslora=true]", "lora[r=8,use_rslora=true]"] * 2
    with pytest.raises(FinloraError, match=r"two of them are the same run, lora\[use_dora=true\]"):
        plan(None, [*tiny_overrides, "lora.use_dora=true"], ["lora", "lora[use_dora=true]"], 1)
    with pytest.raises(FinloraError, match=r"--methods: lora\[r\]: expected key=value, not 'r'"):
        parse_methods("lora[r]")
    with pytest.raises(FinloraError, match="config: unknown key 'lora.rank'"):
        plan(None, tiny_overrides, ["lora[rank=8]"], 1)


def test_compare_runs_a_variant_as_its_own_row(tiny_overrides: list[str], tmp_path: Path) -> None:
    output = tmp_path / "cmp"
    table = compare(
        None,
        [*tiny_overrides, "train.max_steps=1"],
        ["lora", "lora[use_dora=true]"],
        output,
        progress_bar=False,
        log=quiet,
    )
    rows = table["methods"]
    assert [(r["method"], r["label"]) for r in rows] == [
        ("lora", "lora"),
        ("lora", "lora[use_dora=true]"),
    ]
    assert [Path(r["run_dir"]).name for r in rows] == ["lora", "lora-use_dora=true"]
    assert load_run(output / "lora-use_dora=true").cfg.lora.use_dora
    assert "| lora[use_dora=true] |" in (output / "compare.md").read_text()
