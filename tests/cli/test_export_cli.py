"""`finlora export` through the real entry point: --json, text output, one-line errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Result, assert_user_error, run_subprocess

from finlora.config import load_config
from finlora.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    cfg = load_config(None, [*tiny_overrides, "train.max_steps=6", "train.learning_rate=0.01"])
    output = tmp_path_factory.mktemp("export-cli") / "run"
    train(cfg, output, progress_bar=False, log=lambda _msg: None)
    return output


def test_export_gguf_json_subprocess(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gguf"
    result = run_subprocess(
        "export", run_dir, "--format", "gguf", "--quant", "q8_0", "--out", out, "--json",
        "--verify-n", "all", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.err
    (line,) = result.out.splitlines()
    report = json.loads(line)
    assert report["format"] == "gguf" and report["dtype"] == "q8_0" and report["verified"]
    assert report["n"] == 12 and report["max_abs_logit_diff"] < 1e-4
    assert report["gguf_checked"] and report["gguf_n"] == 12 and report["gguf_agreement"] >= 0.9
    assert report["files"] == ["Modelfile", "README.md", "finlora_export.json", "run-q8_0.gguf"]
    assert sorted(p.name for p in out.iterdir()) == report["files"]


def test_export_hf_text(cli: Callable[..., Result], run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    result = cli("export", run_dir, "--format", "hf", "--out", out, "--verify-n", "5")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith(f"wrote hf (f32) to {out}: README.md, config.json, ")
    assert lines[1].startswith("verified on 5 sentences: max |logit diff| ")
    assert lines[1].endswith("labels agree 100.0%")
    assert (out / "model.safetensors").is_file()


def test_export_help(cli: Callable[..., Result]) -> None:
    result = cli("export", "--help")
    assert result.code == 0 and result.out.startswith("Usage: finlora export ")
    assert "finlora export runs/fpb --format gguf --quant q8_0" in result.out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--format", "hf", "--dtype", "f8"), "--dtype: 'f8' is not one of f32, f16, bf16"),
        (("--format", "gguf", "--quant", "q3_k"), "--quant: 'q3_k' is not one of"),
        (("--format", "hf", "--quant", "q8_0"), "--quant applies to --format gguf only"),
        (("--format", "onnx",), "--format: 'onnx' is not one of hf, state_dict, gguf"),
        (("--format", "hf", "--verify-n", "many"), "--verify-n: expected a number or 'all'"),
    ],
)  # fmt: skip
def test_export_bad_options(
    cli: Callable[..., Result], run_dir: Path, tmp_path: Path, args: tuple[str, ...], fragment: str
) -> None:
    out = tmp_path / "out"
    assert_user_error(cli("export", run_dir, "--out", out, *args), fragment)
    assert not out.exists()


def test_export_missing_run(cli: Callable[..., Result], tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = cli("export", missing, "--format", "hf", "--out", tmp_path / "out")
    assert_user_error(result, f"{missing}: no such run directory")


def test_export_existing_out(cli: Callable[..., Result], run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep")
    result = cli("export", run_dir, "--format", "state_dict", "--out", out)
    assert_user_error(result, f"{out}: output directory exists and is not empty (use --overwrite)")
    assert (out / "x").read_text() == "keep"


def test_export_unmergeable_method(
    cli: Callable[..., Result], run_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "prefix-run"
    shutil.copytree(run_dir, run)
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text()) | {"peft_type": "PREFIX_TUNING"}
    config_path.write_text(json.dumps(config))
    result = cli("export", run, "--format", "hf", "--out", tmp_path / "out")
    assert_user_error(result, "prefix tuning cannot be merged", "finlora predict")
    assert not (tmp_path / "out").exists()
