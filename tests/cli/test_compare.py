"""`finlora compare` through the real entry point, on the tiny model: the table, its files,
and the run directories it keeps; bad method lists get one line and exit status 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Result, set_args

from finlora.inference import load_run

Invoke = Callable[..., Result]


def without_lora(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("lora.")]


def test_compare_json(cli: Invoke, tiny_overrides: list[str], tmp_path: Path) -> None:
    output = tmp_path / "cmp"
    code, out, err = cli(
        "compare", "--methods", "lora,prompt,freeze", "--output", output, "--json",
        "--no-progress", *set_args([*tiny_overrides, "train.max_steps=2"]),
    )  # fmt: skip
    assert code == 0, err
    table = json.loads(out)
    rows = table["methods"]
    assert [r["method"] for r in rows] == ["lora", "prompt", "freeze"]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
        assert 0 < row["trainable_params"] < row["total_params"]
        assert row["steps"] == 2 and row["adapter_bytes"] > 0
        assert row["train_s"] > 0 and row["peak_rss_mib"] > 0
        run_dir = Path(row["run_dir"])
        assert run_dir == output / row["method"]
        assert load_run(run_dir).cfg.method.name == row["method"]
        assert not (run_dir / "checkpoints").exists()
        assert (run_dir / "eval" / "test.json").is_file()
    # The lora section of the shared overrides reached lora only.
    assert json.loads((output / "lora" / "manifest.json").read_text())["method_options"]["r"] == 4
    assert table["seeds"] == [42] and table["steps"] == 2
    assert json.loads((output / "compare.json").read_text())["methods"] == rows
    markdown = (output / "compare.md").read_text()
    assert "| method | accuracy | macro-F1 |" in markdown and "| prompt |" in markdown
    assert "finlora compare --methods lora,prompt,freeze" in markdown
    assert (output / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_compare_seeds_table(cli: Invoke, tiny_overrides: list[str], tmp_path: Path) -> None:
    output = tmp_path / "cmp"
    code, out, err = cli(
        "compare", "--methods", "ia3", "--seeds", "2", "--output", output, "--no-progress",
        *set_args([*without_lora(tiny_overrides), "train.max_steps=1", "seed=7"]),
    )  # fmt: skip
    assert code == 0, err
    assert "| ia3 | " in out and " ± " in out
    table = json.loads((output / "compare.json").read_text())
    assert table["seeds"] == [7, 8]
    (row,) = table["methods"]
    assert [r["seed"] for r in row["runs"]] == [7, 8]
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == ["ia3-seed7", "ia3-seed8"]


def test_compare_an_instruct_recipe(cli: Invoke, tiny_overrides: list[str], tmp_path: Path) -> None:
    from test_instruct_cli import instruct_rows

    data = tmp_path / "fin.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruct_rows()), encoding="utf-8")
    output = tmp_path / "cmp"
    overrides = [*without_lora(tiny_overrides), "task=instruct", f"data.path={data}",
                 "data.template=alpaca", "train.max_steps=2"]  # fmt: skip
    code, out, err = cli(
        "compare", "--methods", "ia3,prompt", "--output", output, "--json", "--no-progress",
        *set_args(overrides),
    )  # fmt: skip
    assert code == 0, err
    table = json.loads(out)
    assert table["task"] == "instruct"
    for row in table["methods"]:
        metrics = json.loads((Path(row["run_dir"]) / "eval" / "test.json").read_text())
        for key in ("perplexity", "bleu", "rouge1", "rougeL"):
            assert row[key] == metrics[key] and row[f"{key}_std"] is None
        assert row["perplexity"] > 1 and 0 <= row["rougeL"] <= 1
        assert "accuracy" not in row
    markdown = (output / "compare.md").read_text()
    assert "| method | perplexity | BLEU | ROUGE-1 | ROUGE-L | trainable params |" in markdown
    assert "| ia3 | " in markdown and "| prompt | " in markdown
    assert (output / "compare.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("methods", "fragment"),
    [
        ("lora,adapterx", "--methods: unknown method 'adapterx' (known: lora, prefix,"),
        ("lora,lora", "--methods: a method is named twice"),
        (",", "--methods: name at least one method"),
    ],
)
def test_compare_bad_methods(
    cli: Invoke, tiny_overrides: list[str], tmp_path: Path, methods: str, fragment: str
) -> None:
    output = tmp_path / "cmp"
    code, out, err = cli(
        "compare", "--methods", methods, "--output", output, *set_args(tiny_overrides)
    )
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("finlora: error: ") and fragment in line
    assert not output.exists()


def test_compare_refuses_options_for_a_method_it_does_not_run(
    cli: Invoke, tiny_overrides: list[str], tmp_path: Path
) -> None:
    output = tmp_path / "cmp"
    code, _, err = cli(
        "compare", "--methods", "lora,full", "--output", output,
        *set_args([*tiny_overrides, "prefix.num_virtual_tokens=8"]),
    )  # fmt: skip
    assert code == 2
    assert err == (
        "finlora: error: --set prefix.num_virtual_tokens=8: method prefix is not among "
        "--methods (lora,full)\n"
    )
    code, _, err = cli(
        "compare", "--methods", "lora,full", "--output", output,
        *set_args([*tiny_overrides, "full.learning_rate=-1"]),
    )  # fmt: skip
    assert code == 2
    assert err == "finlora: error: config: full.learning_rate must be positive or null (got -1.0)\n"
    assert not output.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("model.name=ENCODER", "method prefix cannot tune an encoder model"),
        ("prefix.num_virtual_tokens=200", "prefix.num_virtual_tokens=200 and data.max_length"),
    ],
)
def test_compare_checks_every_method_against_the_model_first(
    cli: Invoke,
    tiny_overrides: list[str],
    tiny_encoder_dir: Path,
    tmp_path: Path,
    extra: str,
    message: str,
) -> None:
    """Its kind and its positions, before the first method trains."""
    output = tmp_path / "cmp"
    overrides = [
        *tiny_overrides,
        "data.max_length=128",
        extra.replace("ENCODER", str(tiny_encoder_dir)),
    ]
    code, _, err = cli(
        "compare", "--methods", "lora,prefix", "--output", output, *set_args(overrides)
    )
    assert code == 2
    assert err.startswith(f"finlora: error: {message}")
    assert not output.exists()  # lora did not train first


def test_compare_refuses_a_non_empty_output(
    cli: Invoke, tiny_overrides: list[str], tmp_path: Path
) -> None:
    output = tmp_path / "cmp"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, _, err = cli(
        "compare", "--methods", "lora", "--output", output, *set_args(tiny_overrides)
    )
    assert code == 2
    expected = "output directory exists and is not empty (--overwrite replaces it)"
    assert err == f"finlora: error: {output}: {expected}\n"
    assert (output / "keep.txt").read_text() == "mine"
