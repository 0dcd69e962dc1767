"""Export on the tiny Llama: merged Hugging Face checkpoint, state dict and GGUF, each verified,
and the refusals (empty adapter, a merge that changes nothing, unmergeable methods)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file, save_file

from finlora.config import load_config
from finlora.errors import FinloraError
from finlora.export import ExportOptions, ExportResult, export_run
from finlora.export.gguf_writer import permute_rotary
from finlora.inference import load_run
from finlora.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    """One tiny LoRA run, trained hard enough (lr 0.01) that the adapter moves the logits."""
    cfg = load_config(None, [*tiny_overrides, "train.max_steps=6", "train.learning_rate=0.01"])
    output = tmp_path_factory.mktemp("export") / "run"
    train(cfg, output, progress_bar=False, log=lambda _msg: None)
    return output


def export(run: Path, fmt: str, out: Path, **kwargs: object) -> ExportResult:
    return export_run(run, ExportOptions(fmt, out, verify_n=None, **kwargs))  # type: ignore[arg-type]


def copy_run(run: Path, where: Path) -> Path:
    target = where / "run-copy"
    shutil.copytree(run, target)
    return target


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def rewrite_lora_b(run: Path, value: float) -> None:
    tensors = {
        k: torch.full_like(v, value) if "lora_B" in k else v
        for k, v in adapter_tensors(run).items()
    }
    save_file(tensors, str(run / "adapter" / "adapter_model.safetensors"))


def test_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(FinloraError, match="--dtype: 'f8' is not one of f32, f16, bf16"):
        ExportOptions("hf", tmp_path, dtype="f8")
    with pytest.raises(FinloraError, match="--quant applies to --format gguf only"):
        ExportOptions("hf", tmp_path, quant="q8_0")
    with pytest.raises(FinloraError, match="--quant: 'q2_k' is not one of"):
        ExportOptions("gguf", tmp_path, quant="q2_k")
    with pytest.raises(FinloraError, match="--format: 'onnx' is not one of hf, state_dict, gguf"):
        ExportOptions("onnx", tmp_path)


def test_hf_round_trip_with_plain_transformers(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    result = export(run_dir, "hf", out)
    v = result.verification
    assert result.verified and v.n == 12 and v.label_agreement == 1.0
    assert v.max_abs_logit_diff is not None and v.max_abs_logit_diff < 1e-4
    assert v.changed_tensors == 14  # 2 layers x 7 linear layers, all LoRA targets
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "README.md", "finlora_export.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    assert "lora" not in json.dumps(json.loads((out / "config.json").read_text())).lower()

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    loaded = load_run(run_dir)  # the adapter model as finlora predicts with it
    ids = torch.tensor([loaded.codec.encode_text("Net sales fell 12 % to EUR 3.1 mn .")])
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    record = json.loads((out / "finlora_export.json").read_text())
    assert record["labels"] == ["negative", "neutral", "positive"]
    assert record["verification"]["max_abs_logit_diff"] == v.max_abs_logit_diff
    # What the record and the card say reproduces finlora's prompt ids from the text alone.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "Net sales fell 12 % to EUR 3.1 mn ."
    pieces = record["prompt_ids"]
    rebuilt = pieces["before_text"] + tok(text, add_special_tokens=False).input_ids
    assert rebuilt + pieces["after_text"] == ids[0].tolist()
    assert record["label_ids"] == loaded.codec.label_ids
    assert "tokens(BEFORE) + tokens(text) + tokens(AFTER)" in (out / "README.md").read_text()


def test_hf_export_loads_without_finlora_or_peft(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    export(run_dir, "hf", out, dtype="bf16")
    # A fresh interpreter that loads the export and then shows neither package was imported.
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "logits = model(**tok('Sales rose', return_tensors='pt')).logits\n"
        "imported = sorted({m.split('.')[0] for m in sys.modules} & {'peft', 'finlora'})\n"
        "print(model.dtype, tuple(logits.shape[:1]), imported)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "torch.bfloat16 (1,) []"


def test_state_dict_export(run_dir: Path, tmp_path: Path) -> None:
    result = export(run_dir, "state_dict", tmp_path / "sd", dtype="f16")
    assert result.files == ["finlora_export.json", "model.safetensors"]
    assert result.verification.label_agreement == 1.0
    weights = load_file(str(tmp_path / "sd" / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in weights.values())
    # The tiny model's head is untied, so it is stored; no LoRA names survive the merge.
    assert "model.layers.0.self_attn.q_proj.weight" in weights and "lm_head.weight" in weights
    assert not [k for k in weights if "lora" in k or "base_layer" in k]
    assert result.verification.changed_tensors == 14


def test_zero_adapter_is_refused(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path)
    rewrite_lora_b(run, 0.0)
    out = tmp_path / "out"
    with pytest.raises(FinloraError, match=r"all 14 adapter tensors .* are zero"):
        export(run, "hf", out)
    assert not out.exists()


def test_no_op_merge_is_refused(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path)
    # A non-zero update far below fp32 resolution: B·A adds nothing to W0.
    rewrite_lora_b(run, 1e-30)
    out = tmp_path / "out"
    with pytest.raises(FinloraError, match="the merge left every weight equal to the base"):
        export(run, "hf", out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    ("peft_type", "name"),
    [("PREFIX_TUNING", "prefix tuning"), ("PROMPT_TUNING", "prompt tuning"),
     ("P_TUNING", "P-tuning")],
)  # fmt: skip
def test_unmergeable_methods_are_refused(
    run_dir: Path, tmp_path: Path, peft_type: str, name: str
) -> None:
    run = copy_run(run_dir, tmp_path)
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"peft_type": peft_type}))
    with pytest.raises(FinloraError, match=f"{name} cannot be merged into the model's weights"):
        export(run, "gguf", tmp_path / "out")


def test_existing_out_needs_overwrite(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export(run_dir, "state_dict", out)
    with pytest.raises(FinloraError, match="output directory exists and is not empty"):
        export(run_dir, "state_dict", out)
    (out / "stale.txt").write_text("from the last export")
    export(run_dir, "state_dict", out, overwrite=True)  # an earlier export: replaced
    assert sorted(p.name for p in out.iterdir()) == ["finlora_export.json", "model.safetensors"]


def test_overwrite_replaces_only_an_earlier_export(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(FinloraError, match="no finlora export and --overwrite leaves it alone"):
        export(run_dir, "state_dict", mine, overwrite=True)
    assert (mine / "keep.txt").read_text() == "mine"
    # Neither the run itself nor a folder holding it, with or without --overwrite.
    runs = tmp_path / "runs"
    run = runs / "a"
    shutil.copytree(run_dir, run)
    for out in (run, runs):
        with pytest.raises(FinloraError, match="would replace the run"):
            export(run, "state_dict", out, overwrite=True)
    assert (run / "adapter").is_dir()
    with pytest.raises(FinloraError, match="/proc: cannot create a file here"):
        export(run, "state_dict", Path("/proc/finlora-export"))


def test_permute_rotary_pairs_halves() -> None:
    # One head of dim 4: HF rows (x0, x1 | y0, y1) rotate x_i with y_i; llama.cpp wants pairs.
    rows = torch.arange(8.0).view(8, 1)  # 2 heads
    assert permute_rotary(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def gguf_fields(path: Path) -> dict[str, object]:
    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize(("quant", "max_diff"), [("f16", 0.02), ("q8_0", 0.1)])
def test_gguf_agrees_in_llama_cpp(
    run_dir: Path, tmp_path: Path, quant: str, max_diff: float
) -> None:
    result = export(run_dir, "gguf", tmp_path / "gguf", quant=quant)
    v = result.verification
    # CI installs the llama extra (`make test`), so llama.cpp really runs here.
    assert v.gguf_checked, v.gguf_note
    assert v.gguf_n == 12 and v.gguf_tokens_equal == 1.0
    # Label log-likelihoods, not just labels: a near-tie on a tiny model may flip a label.
    assert v.gguf_max_abs_loglik_diff is not None and v.gguf_max_abs_loglik_diff < max_diff
    assert v.gguf_agreement is not None and v.gguf_agreement >= 11 / 12
    (name,) = [f for f in result.files if f.endswith(".gguf")]
    fields = gguf_fields(tmp_path / "gguf" / name)
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    reader = GGUFReader(tmp_path / "gguf" / name)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in types  # the tiny model's head is not tied


def test_a_llama_cpp_that_dies_is_one_error_and_nothing_written(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A llama.cpp build whose instructions this CPU refuses dies by SIGILL (its AMX kernels in
    a VM did): the child process that tries the file first turns that into an error."""
    from finlora.export import llama_cpp

    probe = "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n"
    monkeypatch.setattr(llama_cpp, "_PROBE", probe)
    with pytest.raises(FinloraError, match="died by SIGILL .*GGML_NATIVE=OFF"):
        export(run_dir, "gguf", tmp_path / "gguf", quant="f16")
    assert not (tmp_path / "gguf").exists()


def test_a_gguf_llama_cpp_disagrees_with_is_an_error_and_nothing_written(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file llama.cpp reads but scores unlike the adapter model (misnamed or mislaid tensors
    give about chance, or the majority label throughout) is not written."""
    from finlora.export import llama_cpp, verify
    from finlora.export.llama_cpp import Agreement

    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    found = [Agreement(agreement=7 / 12, tokens_equal=1.0, max_abs_loglik_diff=3.2)]
    monkeypatch.setattr(verify.LabelCheck, "gguf", lambda *_: found[0])
    with pytest.raises(FinloraError, match=r"only 58\.3% of 12 sentences \(at least 90\.0%"):
        export(run_dir, "gguf", tmp_path / "f16", quant="f16")
    assert not (tmp_path / "f16").exists()
    # Fewer bits are allowed more disagreement, down to 75%.
    found[0] = Agreement(agreement=10 / 12, tokens_equal=1.0, max_abs_loglik_diff=3.2)
    with pytest.raises(FinloraError, match=r"at least 90\.0%"):
        export(run_dir, "gguf", tmp_path / "q8", quant="q8_0")
    result = export(run_dir, "gguf", tmp_path / "q4", quant="q4_0")
    assert result.verification.gguf_agreement == 10 / 12
    assert (tmp_path / "q4" / "finlora_export.json").exists()


def test_gguf_reads_back_into_transformers(run_dir: Path, tmp_path: Path) -> None:
    """Tensor names and the Q/K row order, checked by transformers' own GGUF reader."""
    from transformers import AutoModelForCausalLM

    result = export(run_dir, "gguf", tmp_path / "gguf", dtype="f32")
    (name,) = [f for f in result.files if f.endswith(".gguf")]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=name).eval()
    loaded = load_run(run_dir)
    ids = torch.tensor([loaded.codec.encode_text("Operating profit rose to EUR 13.1 mn .")])
    with torch.no_grad():
        diff = (back(input_ids=ids).logits - loaded.model(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-4
    assert np.isfinite(float(diff))


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("ia3", ["ia3.learning_rate=0.05"]),
        ("freeze", ["freeze.layers=1", "freeze.learning_rate=0.01"]),
        ("full", ["full.learning_rate=0.01"]),
    ],
)
def test_mergeable_methods_export_and_reload_exactly(
    tiny_overrides: list[str], tmp_path: Path, method: str, extra: list[str]
) -> None:
    shared = [o for o in tiny_overrides if not o.startswith("lora.")]
    cfg = load_config(None, [*shared, f"method.name={method}", *extra])
    run = tmp_path / method
    train(cfg, run, progress_bar=False, log=lambda _msg: None)
    result = export(run, "hf", tmp_path / "hf")
    v = result.verification
    assert result.verified and v.label_agreement == 1.0
    assert v.max_abs_logit_diff is not None and v.max_abs_logit_diff < 1e-4
    assert v.changed_tensors is not None and v.changed_tensors > 0
    # The export predicts as the run does when scored by finlora itself.
    from transformers import AutoModelForCausalLM

    loaded = load_run(run)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    texts = ["Net sales fell 30 %.", "The company opened an office."]
    from finlora.scoring import predict_proba

    ours = predict_proba(exported, loaded.codec, texts, progress=False, fast=False)
    np.testing.assert_allclose(
        ours, loaded.proba(texts, progress=False, calibrate=False), atol=1e-5
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_encoder_classifier_exports_for_the_classification_pipeline(
    tiny_overrides: list[str], tiny_encoder_dir: Path, tmp_path: Path, method: str
) -> None:
    shared = [o for o in tiny_overrides if not o.startswith("lora.")]
    cfg = load_config(
        None, [*shared, f"model.name={tiny_encoder_dir}", f"method.name={method}", "seed=4"]
    )
    run = tmp_path / method
    train(cfg, run, progress_bar=False, log=lambda _msg: None)
    out = tmp_path / "hf"
    result = export(run, "hf", out)
    v = result.verification
    assert result.verified and v.label_agreement == 1.0
    assert v.max_abs_logit_diff is not None and v.max_abs_logit_diff < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    card = (out / "README.md").read_text()
    assert 'pipeline("text-classification", model=".")' in card
    # The card's snippet, run as written from the export directory, gives the run's label.
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    proc = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd=out
    )
    assert proc.returncode == 0, proc.stderr
    called = re.search(r"classify\((.*)\)\[0\]", snippet)
    assert called is not None
    (predicted,) = load_run(run).predict([ast.literal_eval(called.group(1))], progress=False)
    assert proc.stdout.split() == [predicted.label]
    # Plain transformers, as a user would call it, gives the run's own probabilities.
    from transformers import pipeline

    texts = ["Net sales fell 30 %.", "The company opened an office.", "Profit doubled."]
    classify = pipeline("text-classification", model=str(out), top_k=None)
    served = [{d["label"]: d["score"] for d in row} for row in classify(texts)]
    expected = load_run(run).proba(texts, progress=False, calibrate=False)
    for row, probs in zip(served, expected, strict=True):
        assert [row[label] for label in FPB_ORDER] == pytest.approx(list(probs), abs=1e-5)
    with pytest.raises(FinloraError, match="export encoder models with --format hf"):
        export(run, "gguf", tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


FPB_ORDER = ["negative", "neutral", "positive"]


def test_gguf_agreement_must_beat_the_majority_label() -> None:
    from finlora.export.verify import majority_share, required_agreement

    # FPB's balance: the fixed floor decides.
    assert majority_share([0] * 60 + [1] * 25 + [2] * 15) == 0.6
    assert required_agreement("q8_0", 0.6) == 0.9
    assert required_agreement("q4_0", 0.6) == 0.8
    # One label on 96% of the sentences: a file that always says it agrees 96%, and must fail.
    assert required_agreement("q8_0", 0.96) == pytest.approx(0.98)
    assert required_agreement("q4_0", 0.96) > 0.96
    assert majority_share([]) == 0.0
