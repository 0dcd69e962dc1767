"""`finlora train` through the real entry point on inputs drawn by hypothesis (`--set` values,
data files): every run ends finished (exit 0, a whole run directory) or as one line
`finlora: error: ...` with exit 2 and no run directory left behind; never a traceback.

Few examples each: an input that happens to be valid trains the tiny model for a step."""

from __future__ import annotations

import itertools
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from cli_support import Result, set_args
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

# The `cli` fixture is function-scoped: it is reset by hand between examples (a fresh --output,
# capsys read on every call), which is what the health check is there to make sure of.
CLI = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_outputs = itertools.count()

# Keys whose any value keeps a run of the tiny model short: no step counts, ranks, batch sizes,
# lengths or torch.compile, which could turn a drawn value into minutes of training.
KEYS = ["seed", "task", "method.name", "model.kind", "data.format", "data.agreement",
        "data.text_column", "data.label_column", "data.label_map", "data.labels",
        "data.test_fraction", "data.val_fraction", "data.template", "train.learning_rate",
        "train.weight_decay", "train.warmup_ratio", "train.max_grad_norm", "train.device",
        "train.precision", "lora.lora_dropout", "lora.target_modules", "lora.bias",
        "speed.attention", "speed.group_by_length", "speed.trim_padding", "speed.fused_lora",
        "speed.lean_mlp", "speed.label_logits_only", "speed.gradient_checkpointing"]  # fmt: skip
VALUES = ["", "0", "1", "-1", "0.5", "1e-4", "1e400", ".nan", "true", "null", "[a, b]",
          "{a: 1}", "2020-01-01", "!!binary aGk=", "cpu", "cuda", "bf16", "full", "ia3", "prefix",
          "instruct", "csv", "jsonl", "75", "0=negative,1=neutral,2=positive",
          "[negative, neutral, positive]", "[q_proj]", "sentiment", "alpaca", "chat",
          "eager"]  # fmt: skip
# What a shell can pass: no NUL, and no lone surrogates (a terminal's undecodable bytes), which
# the in-process capture of stderr cannot write though a real stderr can.
argv_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                    max_size=30)  # fmt: skip
# Values each key takes, so that a good share of the drawn runs get as far as training.
VALID = {"seed": ["0", "7"], "method.name": ["ia3", "full", "freeze", "prompt"],
         "data.test_fraction": ["0.3"], "data.val_fraction": ["0", "0.3"],
         "data.template": ["sentiment"], "train.learning_rate": ["0.01"],
         "train.weight_decay": ["0.1"], "train.warmup_ratio": ["0.5"],
         "train.max_grad_norm": ["0.5"], "train.device": ["cpu"], "train.precision": ["bf16"],
         "lora.lora_dropout": ["0.1"], "lora.target_modules": ["[q_proj, v_proj]"],
         "lora.bias": ["lora_only"], "speed.attention": ["eager"],
         "speed.group_by_length": ["false"], "speed.trim_padding": ["false"],
         "speed.fused_lora": ["true"], "speed.lean_mlp": ["true"],
         "speed.label_logits_only": ["false"],
         "speed.gradient_checkpointing": ["true"]}  # fmt: skip


@st.composite
def set_items(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(KEYS))
    valid = st.sampled_from(VALID.get(key, VALUES))
    return f"{key}={draw(st.one_of(valid, valid, st.sampled_from(VALUES), argv_text))}"


def check_outcome(result: Result, output: Path) -> None:
    """A finished run, or one error line (after any progress lines) and no run directory."""
    assert "Traceback" not in result.err, result.err
    if result.code == 0:
        assert (output / "adapter").is_dir() and (output / "metrics.jsonl").is_file()
        return
    assert result.code == 2, result
    errors = [line for line in result.err.splitlines() if line.startswith("finlora: error: ")]
    assert len(errors) == 1 and result.err.splitlines()[-1] == errors[0], result.err
    assert not output.exists(), "a failed train left its output directory"
    # a failure after the run directory was made leaves the parent it had to create, empty
    assert not output.parent.exists() or not any(output.parent.iterdir())


def train(cli: Callable[..., Result], tmp_path: Path, overrides: list[str]) -> None:
    output = tmp_path / "runs" / str(next(_outputs)) / "new"
    result = cli("train", "--output", output, "--no-progress", *set_args(overrides))
    event(f"exit {result.code}")  # --hypothesis-show-statistics: how often a run is valid
    check_outcome(result, output)
    shutil.rmtree(output, ignore_errors=True)


@CLI
@given(st.lists(set_items(), min_size=1, max_size=3))
@example(["data.label_map=0=neg\nx"])
@example(["data.labels=[negative, neutral, positive, neutral]"])
@example(["data.template=sentiment"])
def test_train_with_drawn_set_values(
    cli: Callable[..., Result], tiny_overrides: list[str], tmp_path: Path, items: list[str]
) -> None:
    train(cli, tmp_path, [*tiny_overrides, "train.max_steps=1", *items])


def _shuffled(drawn: list[bytes] | tuple[list[bytes], list[bytes], random.Random]) -> bytes:
    if isinstance(drawn, list):
        return b"\n".join(drawn)
    good, odd, rng = drawn
    lines = good + odd
    rng.shuffle(lines)
    return b"\n".join(lines)


good_line = st.sampled_from(
    ["Sales rose 5 %.@positive", "Costs fell.@negative", "The meeting is in May.@neutral"]
)
odd_line = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"Sales rose\xc2\x9d 5 %.@positive", b"\x00@neutral", b"no label here",
                     b"Sales@Positive", b"\xef\xbb\xbfSales rose.@positive", b"x@pos\ritive",
                     "Sales\u2028rose.@positive".encode(), b"\xe9t\xe9 rose.@positive"]),
)  # fmt: skip
fpb_files = st.one_of(
    st.lists(st.one_of(good_line.map(str.encode), odd_line), max_size=40),
    # enough of each label for the split, with maybe an odd line or two somewhere
    st.tuples(st.lists(good_line.map(str.encode), min_size=45, max_size=60),
              st.lists(odd_line, max_size=2), st.randoms()),
).map(_shuffled)  # fmt: skip


@CLI
@given(fpb_files)
@example(b"\n".join([b"Sales rose\xc2\x9d 5 %.@positive"] * 10 + [b"Costs fell.@negative"] * 10
                    + [b"The meeting is in May.@neutral"] * 10))  # fmt: skip
def test_train_on_drawn_data_files(
    cli: Callable[..., Result], tiny_overrides: list[str], tmp_path: Path, data: bytes
) -> None:
    path = tmp_path / "drawn" / "Sentences_drawn.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    train(cli, tmp_path, [*tiny_overrides, "train.max_steps=1", f"data.path={path}"])


def test_a_train_that_fails_after_starting_leaves_no_run_directory(
    cli: Callable[..., Result], tiny_overrides: list[str], tmp_path: Path
) -> None:
    """A learning rate of 1e30 passes every check made before the run directory is created and
    drives the loss to NaN at the second step: the half-made run is removed."""
    output = tmp_path / "runs" / "new"
    overrides = [*tiny_overrides, "train.learning_rate=1e30"]
    result = cli("train", "--output", output, "--no-progress", *set_args(overrides))
    assert result.code == 2 and "training diverged" in result.err.splitlines()[-1]
    check_outcome(result, output)
