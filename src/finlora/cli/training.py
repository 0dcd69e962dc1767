"""The commands that train: `train`, `compare` (several methods) and `demo`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from finlora.cli.options import (
    as_json_option,
    echo_err,
    no_progress_option,
    output_option,
    trust_remote_code_option,
)
from finlora.errors import FinloraError


def _stamped(stem: str) -> Path:
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _trained_line(result: Any) -> str:
    best = ""
    if result.best_val_accuracy is not None:
        best = f", best epoch {result.best_epoch} (val accuracy {result.best_val_accuracy:.4f})"
    elif result.best_val_loss is not None:  # instruct runs: answer-token loss
        best = f", best epoch {result.best_epoch} (val loss {result.best_val_loss:.4f})"
    took = result.train_seconds
    seconds = f"{took:.1f}s" if took < 10 else f"{took:.0f}s"  # a short run is not "0s"
    steps = f"{result.steps} steps"
    if result.steps_now != result.steps:  # resumed: this call's share of the run
        steps = f"{result.steps_now} more steps (to step {result.steps})"
    return (
        f"trained {steps} in {seconds} "
        f"({result.real_tokens_per_s:.0f} tokens/s, peak RSS {result.peak_rss_mib / 1024:.2f} GiB)"
        f"{best}"
    )


def _with_start(
    overrides: tuple[str, ...], start_from: Path | None, resume: bool
) -> tuple[str, ...]:
    """`--from RUN` as the setting it stands for, method.start_from (an absolute path)."""
    if start_from is None:
        return overrides
    if resume:
        raise FinloraError("--from starts a new run; --resume continues one (give one)")
    return (*overrides, f"method.start_from={start_from.expanduser().resolve()}")


@click.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.epochs=3 (repeatable).",
)
@output_option("Run directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty run directory.")
@click.option("--resume", is_flag=True, help="Continue the stopped run in --output.")
@click.option(
    "--from",
    "start_from",
    type=click.Path(path_type=Path),
    help="Start from this finished run's trained adapter and train it further (the same base "
    "model, method and method options); e.g. preference tuning after instruction tuning.",
)
@no_progress_option("No progress bar (logs only).")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train data-parallel in this many processes (one a GPU; on a CPU they share its "
    "cores). Same results as one process, batch for batch.",
)
@trust_remote_code_option
def train(
    config: Path | None,
    overrides: tuple[str, ...],
    output: Path | None,
    overwrite: bool,
    resume: bool,
    start_from: Path | None,
    no_progress: bool,
    nproc: int,
    trust_remote_code: bool,
) -> None:
    """Fine-tune a model as CONFIG says (method.name: lora, prefix, prompt, ptuning, ia3,
    freeze or full), into a run directory. Without CONFIG, the built-in defaults: the
    recipe of configs/fpb-smollm2-lora.yaml (LoRA on SmolLM2-135M-Instruct, Financial
    PhraseBank from $FINLORA_FPB_DIR or data.path).

    \b
    Example:
      finlora train --output runs/fpb                 # the default recipe
      finlora train configs/fpb-smollm2-lora.yaml --set train.epochs=1 --output runs/fpb
      finlora train --resume --output runs/fpb        # continue after a stop
      finlora train configs/fin-preference-smollm2-dpo.yaml --from runs/fin-instruct \\
          --output runs/fin-dpo                       # DPO on an instruct run's adapter
      finlora train configs/fpb-smollm2-lora.yaml --nproc 4 --output runs/fpb4  # 4 GPUs
    """
    from finlora.config import load_config
    from finlora.distributed import World, launch_train
    from finlora.train import resume_config
    from finlora.train import train as run_training

    overrides = _with_start(overrides, start_from, resume)
    if resume:
        if output is None:
            raise FinloraError("--resume needs --output RUN_DIR (the run to continue)")
        if config is not None:
            raise FinloraError(
                f"{config}: --resume continues with the run's own config.yaml; drop CONFIG"
            )
        cfg = resume_config(output, list(overrides))
    else:
        cfg = load_config(config, list(overrides))
        output = output or _stamped(config.stem if config else "run")
    if nproc > 1:
        launched = launch_train(
            nproc, cfg.train.device, output, config=config, overrides=overrides,
            overwrite=overwrite, resume=resume, progress_bar=not no_progress,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        for message in launched.errors:
            echo_err(f"finlora: error: {message}")
        if launched.status:
            sys.exit(launched.status)
        return
    result = run_training(
        cfg, output, overwrite=overwrite, resume=resume, progress_bar=not no_progress,
        log=echo_err, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    if World.from_env().is_main:  # rank 0 reports for every process
        click.echo(_trained_line(result))
        click.echo(f"run directory: {result.run_dir}")


DEFAULT_METHODS = "lora,prefix,prompt,ptuning,ia3,freeze,full"


@click.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option(
    "--methods",
    default=DEFAULT_METHODS,
    show_default=True,
    help="Comma-separated tuning methods to compare; a method with options of its own section "
    "in brackets is a row of its own, e.g. 'lora,lora[use_dora=true],lora[init=pissa]' (quoted: "
    "the shell reads brackets). A dotted key sets any config value for that row, e.g. "
    "'lora,lora[preference.objective=orpo]'.",
)
@click.option("--seeds", default=1, show_default=True, help="Seeds per method (seed, seed+1, ...).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value for every method, e.g. --set train.max_steps=200.",
)
@output_option("Directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --output.")
@click.option(
    "--from",
    "start_from",
    type=click.Path(path_type=Path),
    help="Start every row from this finished run's trained adapter, as train --from does.",
)
@as_json_option("Print the table as one JSON object.")
@no_progress_option("No progress bars (logs only).")
@trust_remote_code_option
def compare(
    config: Path | None,
    methods: str,
    seeds: int,
    overrides: tuple[str, ...],
    output: Path | None,
    overwrite: bool,
    start_from: Path | None,
    as_json: bool,
    no_progress: bool,
    trust_remote_code: bool,
) -> None:
    """Train and evaluate several tuning methods on the same data, split, seed and steps.

    Writes compare.md, compare.json and compare.png (accuracy and macro-F1, or for an
    instruct recipe perplexity, BLEU and ROUGE; trainable parameters, adapter size, train time,
    peak memory) and keeps each method's run directory.

    \b
    Example:
      finlora compare configs/fpb-smollm2-lora.yaml --methods lora,prompt,full \\
          --set train.max_steps=200 --output runs/compare
      finlora compare configs/fin-instruct-smollm2-lora.yaml --methods lora,ia3 \\
          --set train.max_steps=60 --output runs/compare-instruct
      finlora compare configs/fin-preference-smollm2-dpo.yaml --from runs/fin-instruct \\
          --methods 'lora,lora[preference.objective=orpo]' --output runs/compare-objectives
    """
    import json
    import shlex

    from finlora.compare import compare as run_compare
    from finlora.compare import markdown_table, parse_methods

    output = output or _stamped("compare")
    overrides = _with_start(overrides, start_from, resume=False)
    table = run_compare(
        config, list(overrides), parse_methods(methods), output,
        seeds=seeds, overwrite=overwrite, command=shlex.join(["finlora", *sys.argv[1:]]),
        progress_bar=not no_progress, trust_remote_code=trust_remote_code, log=echo_err,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(table))
        return
    click.echo(markdown_table(table), nl=False)
    click.echo(f"tables and chart: {output}")


@click.command()
@click.option(
    "--output", "-o", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Step budget (default: 50 on FPB, 2 epochs on the synthetic set).",
)
def demo(output: Path, max_steps: int | None) -> None:
    """The main job on the embedded default model: train, evaluate, predict examples.

    Uses Financial PhraseBank when $FINLORA_FPB_DIR is set, else the synthetic set (and says so).
    """
    from finlora.demo import run_demo

    run_demo(output, max_steps, echo=click.echo, log=echo_err)
