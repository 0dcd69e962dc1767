"""Every tuning method on every model kind: it trains, saves, reloads and scores exactly as the
in-memory model did; options and model kinds a method does not take are refused in one line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import finlora.train as train_module
from finlora.config import (
    METHOD_SECTIONS,
    PROMPT_INIT_TEXTS,
    RunConfig,
    config_from_dict,
    load_config,
)
from finlora.data import FPB_LABELS, synthetic_sentiment
from finlora.errors import FinloraError
from finlora.inference import load_run
from finlora.methods import METHODS, build_method, trainable_parameters
from finlora.models import load_base_model
from finlora.models.loading import config_kind
from finlora.prompts import PromptTemplate
from finlora.runs import RunDir
from finlora.scoring import label_loglik, predict_proba, unwrap
from finlora.tasks.classify import LabelCodec

TEXTS = [e.text for e in synthetic_sentiment(6, seed=5)]
ALL = list(METHODS)
PROMPT_LEARNING = ("prefix", "prompt", "ptuning")
# Small and fast versions of each method's options (the defaults suit a real model).
SMALL = {
    "lora": ["lora.r=4", "lora.lora_alpha=8"],
    "prefix": ["prefix.num_virtual_tokens=4"],
    "prompt": ["prompt.num_virtual_tokens=4", "prompt.init_text=negative neutral positive"],
    "ptuning": ["ptuning.num_virtual_tokens=4", "ptuning.encoder_hidden_size=16"],
    "ia3": [],
    "freeze": ["freeze.layers=1"],
    "full": [],
    "adalora": ["adalora.init_r=4", "adalora.target_r=2"],
    "adapter": ["adapter.learning_rate=0.01"],
}


def quiet(message: str) -> None:
    pass


@pytest.fixture
def models(
    tiny_causal_dir: Path, tiny_seq2seq_dir: Path, tiny_encoder_dir: Path, tiny_mt5_dir: Path
) -> dict[str, list[str]]:
    """Per model kind, the overrides that select its tiny model."""
    return {
        "causal": [f"model.name={tiny_causal_dir}"],
        "seq2seq": [f"model.name={tiny_seq2seq_dir}"],
        "encoder": [f"model.name={tiny_encoder_dir}", "model.kind=encoder"],
        "mt5": [f"model.name={tiny_mt5_dir}"],
    }


@pytest.fixture
def method_cfg(tiny_overrides: list[str], models: dict[str, list[str]]) -> Callable[..., RunConfig]:
    """A tiny config for `method` on the tiny model of `kind`; extra overrides win."""

    def build(method: str, kind: str = "causal", *extra: str) -> RunConfig:
        shared = [o for o in tiny_overrides if not o.startswith("lora.")]
        return load_config(
            None, [*shared, *models[kind], f"method.name={method}", *SMALL[method], *extra]
        )

    return build


@pytest.fixture
def capture_saved(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, np.ndarray]]:
    """Probabilities of TEXTS from the in-memory model, each time train() saves the adapter."""
    seen: dict[str, np.ndarray] = {}
    original = train_module._end_epoch

    def end_epoch(model: Any, s: Any, *rest: Any) -> dict[str, Any]:
        row = original(model, s, *rest)
        if row.get("best"):
            fast = s.cfg.speed.label_logits_only
            seen["probs"] = predict_proba(model, s.codec, TEXTS, fast=fast, progress=False)
            model.train()
        return row

    monkeypatch.setattr(train_module, "_end_epoch", end_epoch)
    yield seen


def _train(cfg: RunConfig, output: Path) -> list[float]:
    train_module.train(cfg, output, progress_bar=False, log=quiet)
    return [r["loss"] for r in RunDir(output).read_metrics() if r["kind"] == "step"]


def _assert_round_trip(cfg: RunConfig, output: Path, seen: dict[str, np.ndarray]) -> None:
    losses = _train(cfg, output)
    assert len(losses) == 2 and all(np.isfinite(losses))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["method"] == cfg.method.name
    assert manifest["learning_rate"] == cfg.learning_rate
    assert 0 < manifest["trainable_params"] <= manifest["total_params"]
    marker = json.loads((output / "adapter" / "finlora_method.json").read_text())
    assert marker["method"] == cfg.method.name
    loaded = load_run(output)
    np.testing.assert_allclose(
        loaded.proba(TEXTS, progress=False, calibrate=False), seen["probs"], atol=1e-6
    )


@pytest.mark.parametrize("method", ["lora", "prompt", "ia3", "full"])
def test_mt0_architecture_trains_saves_and_reloads_exactly(
    method: str,
    method_cfg: Callable[..., RunConfig],
    capture_saved: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    """The classic mt0-large + LoRA recipe's architecture, as a local directory (kind: auto)."""
    cfg = method_cfg(method, "mt5", "train.max_steps=2")
    _assert_round_trip(cfg, tmp_path / "run", capture_saved)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["base_model"]["kind"] == (
        "seq2seq"
    )


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_method_trains_saves_and_reloads_exactly(
    method: str,
    kind: str,
    method_cfg: Callable[..., RunConfig],
    capture_saved: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    cfg = method_cfg(method, kind, "train.max_steps=2")
    _assert_round_trip(cfg, tmp_path / "run", capture_saved)


@pytest.mark.parametrize("method", ["lora", "full", "ia3", "prompt", "adalora", "adapter"])
def test_encoder_classifier_trains_saves_and_reloads_exactly(
    method: str,
    method_cfg: Callable[..., RunConfig],
    capture_saved: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    cfg = method_cfg(method, "encoder", "train.max_steps=2", "train.learning_rate=0.01")
    output = tmp_path / "run"
    _assert_round_trip(cfg, output, capture_saved)
    # The head starts random: it must have been saved with the run (the round trip above shows
    # the scores it gives are the trained ones), and there is no zero-shot model without it.
    from safetensors.torch import load_file

    saved = {k for f in (output / "adapter").glob("*.safetensors") for k in load_file(str(f))}
    assert any("classifier" in k for k in saved), sorted(saved)[:5]
    with pytest.raises(FinloraError, match="has no zero-shot answer"):
        load_run(output, zero_shot=True)


def test_tensor_methods_save_only_what_trained(
    method_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    output = tmp_path / "run"
    _train(method_cfg("freeze", "causal", "train.max_steps=2"), output)
    saved = load_file(str(output / "adapter" / "trainable.safetensors"))
    # The tiny Llama has 2 blocks: freeze.layers=1 trains the top one and the final norm.
    assert all(n.startswith(("model.layers.1.", "model.norm.")) for n in saved)
    assert any(n.startswith("model.layers.1.") for n in saved)
    assert "model.norm.weight" in saved


@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_prompt_learning_scores_go_through_the_virtual_tokens(
    method: str, method_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = method_cfg(method)
    base = load_base_model(str(tiny_causal_dir), attention="eager")
    torch.manual_seed(0)
    model = build_method(base.model, cfg, base.kind).eval()
    codec = LabelCodec(
        base.tokenizer, PromptTemplate.load("sentiment"), list(FPB_LABELS), "causal", 128
    )
    prompts = [codec.encode_text(t) for t in TEXTS]
    fast = label_loglik(model, codec, prompts, fast=True)
    plain = label_loglik(model, codec, prompts, fast=False)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-6)
    # The decoder stack alone (the LoRA fast path) would ignore the virtual tokens.
    bare = label_loglik(unwrap(model), codec, prompts, fast=True)
    assert (fast - bare).abs().max() > 1e-4


def test_every_method_has_its_config_section() -> None:
    assert METHODS.keys() == METHOD_SECTIONS.keys()
    for name in METHODS:
        cfg = config_from_dict({"method": {"name": name}})
        assert cfg.method_options is getattr(cfg, name)
        # A saved config holds the chosen method's section only, and loads back as it was.
        data = cfg.to_dict()
        assert [k for k in data if k in METHOD_SECTIONS] == [name]
        assert config_from_dict(data) == cfg


def test_learning_rate_of_the_method_wins() -> None:
    assert config_from_dict({}).learning_rate == 3e-4  # lora: train.learning_rate
    assert config_from_dict({"method": {"name": "full"}}).learning_rate == 5e-5
    cfg = config_from_dict({"method": {"name": "full"}, "full": {"learning_rate": None}})
    assert cfg.learning_rate == cfg.train.learning_rate


def error(*overrides: str) -> str:
    with pytest.raises(FinloraError) as err:
        load_config(None, list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_config_refusals() -> None:
    assert error("method.name=adapterx").startswith(
        "config: method.name must be one of lora, prefix, prompt, ptuning, ia3, freeze, full"
    )
    assert error("method.name=prefix", "lora.r=8") == (
        "config: lora.r is an option of method lora, but method.name is prefix "
        "(set method.name=lora, or drop the lora section)"
    )
    assert error("freeze.layers=2").startswith(
        "config: freeze.layers is an option of method freeze"
    )
    assert error("method.name=prefix", "prefix.r=8").startswith("config: unknown key 'prefix.r'")
    assert error("method.name=freeze", "freeze.layers=0") == (
        "config: freeze.layers must be a positive integer (got 0)"
    )
    assert "prompt.init" in error("method.name=prompt", "prompt.init=vocab")
    assert "ia3.feedforward_modules" in error(
        "method.name=ia3", "ia3.target_modules=[k_proj]", "ia3.feedforward_modules=[down_proj]"
    )
    assert "model.kind" in error("model.kind=vision")


def test_switching_the_method_of_a_lora_recipe() -> None:
    recipe = Path(__file__).parents[2] / "configs" / "fpb-smollm2-lora.yaml"
    assert load_config(recipe).method.name == "lora"
    cfg = load_config(recipe, ["method.name=ia3"])
    assert cfg.method.name == "ia3" and cfg.lora.lora_dropout == 0.0  # the recipe's 0.05 set aside
    with pytest.raises(FinloraError, match="config: lora.r is an option of method lora"):
        load_config(recipe, ["method.name=ia3", "lora.r=8"])


def test_method_that_cannot_serve_the_model_is_refused(
    method_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    with pytest.raises(FinloraError) as err:
        _train(method_cfg("prefix", "encoder"), output)
    assert str(err.value) == (
        "method prefix cannot tune an encoder model (it serves causal, seq2seq); "
        "for encoder models use lora, prompt, ptuning, ia3, freeze, full, adalora, adapter"
    )
    assert not output.exists()  # refused before the run directory was made
    with pytest.raises(FinloraError, match="freeze.layers=5 but the model has 2 blocks"):
        _train(method_cfg("freeze", "causal", "freeze.layers=5"), output)
    with pytest.raises(FinloraError, match="^method ia3: "):
        _train(method_cfg("ia3", "causal", "ia3.target_modules=[nothing_here]"), output)
    assert not output.exists()


def test_bare_encoder_checkpoint_loads_as_a_classifier(tiny_encoder_dir: Path) -> None:
    # Saved as BertModel, as sentence-embedding models are: a new head is drawn for the labels.
    base = load_base_model(str(tiny_encoder_dir), labels=["a", "b", "c"])
    assert base.kind == "encoder" and base.model.config.num_labels == 3


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (transformers.GPT2Config(architectures=["GPT2LMHeadModel"]), "causal"),
        (transformers.LlamaConfig(architectures=["LlamaForCausalLM"]), "causal"),
        (transformers.LlamaConfig(), "causal"),  # no architecture saved
        (transformers.BertConfig(architectures=["BertForMaskedLM"]), "encoder"),
        (transformers.RobertaConfig(architectures=["RobertaModel"]), "encoder"),
        (transformers.T5Config(architectures=["T5ForConditionalGeneration"]), "seq2seq"),
    ],
)
def test_model_kind_from_the_saved_architecture(config: Any, kind: str) -> None:
    assert config_kind(config, Path("m")) == kind


def test_an_ambiguous_architecture_needs_model_kind() -> None:
    # A bare decoder could be meant for generation or for a classification head.
    config = transformers.LlamaConfig(architectures=["LlamaModel"])
    with pytest.raises(FinloraError, match="set model.kind to causal, seq2seq or encoder"):
        config_kind(config, Path("m"))


def test_trainable_share_orders_the_methods(
    method_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    counts = {}
    for method in ALL:
        base = load_base_model(str(tiny_causal_dir))
        counts[method] = trainable_parameters(
            build_method(base.model, method_cfg(method), "causal")
        )
    total = counts["full"][1]
    assert counts["full"][0] == total
    assert all(0 < trainable < total for m, (trainable, _) in counts.items() if m != "full")


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_prompt_init_text_follows_the_task(
    task: str, method_cfg: Callable[..., RunConfig], tiny_causal_dir: Path
) -> None:
    cfg = method_cfg("prompt", "causal", f"task={task}", "prompt.init_text=null")
    if task == "instruct":
        cfg.data.template = "alpaca"
    model = build_method(load_base_model(str(tiny_causal_dir)).model, cfg, "causal")
    assert model.peft_config["default"].prompt_tuning_init_text == PROMPT_INIT_TEXTS[task]
