"""What the commands share: options that several take, and the stderr line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

Decorator = Callable[[Any], Any]


def echo_err(message: str) -> None:
    click.echo(message, err=True)


def run_dir_argument(fn: Any) -> Any:
    return click.argument("run_dir", type=click.Path(path_type=Path))(fn)


def as_json_option(help: str) -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=help)


def zero_shot_option(help: str = "Use the base model without the adapter.") -> Decorator:
    return click.option("--zero-shot", is_flag=True, help=help)


def overwrite_option(help: str = "Replace an existing non-empty --out.") -> Decorator:
    return click.option("--overwrite", is_flag=True, help=help)


def no_progress_option(help: str | None = None) -> Decorator:
    return click.option("--no-progress", is_flag=True, help=help)


def output_option(help: str) -> Decorator:
    return click.option("--output", "-o", type=click.Path(path_type=Path), help=help)


def trust_remote_code_option(fn: Any) -> Any:
    return click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Allow the model's own Python code (runs code from the model/tokenizer directory); "
        "never read from a config or a run.",
    )(fn)


def speed_option(fn: Any) -> Any:
    """`--set speed.x=value` for a trained run, handed to the command as `speed`."""
    return click.option(
        "--set",
        "speed",
        multiple=True,
        metavar="KEY=VALUE",
        help="A speed setting for this use of the run, e.g. --set speed.eval_batch_size=8 "
        "(repeatable).",
    )(fn)
