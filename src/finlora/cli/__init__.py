"""The `finlora` command line: parse, call one library function, print.

The commands live beside this file, by what they work on: `training` (train, compare, demo),
`runs` (eval, predict, analyze, export, serve), `generation` (generate, chat) and `tools`
(models, data, bench). A user mistake (FinloraError) becomes one line on stderr and exit status
2, never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click

from finlora.cli.evaluation import eval_
from finlora.cli.generation import chat, generate
from finlora.cli.options import echo_err
from finlora.cli.runs import analyze, export, predict, serve
from finlora.cli.tools import bench, data, models
from finlora.cli.training import compare, demo, train
from finlora.errors import STOPPED, FinloraError, leave_error, under_launcher


def _quiet_libraries() -> None:
    """Keep library chatter (progress of weight loading, deprecation notes) off the terminal."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    # PEFT says this at every generate of a prompt-learning model, whose positions the model
    # then counts itself (virtual tokens included): nothing for the user to act on.
    warnings.filterwarnings("ignore", message="Position ids are not supported")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # bitsandbytes (the `quant` extra), which PEFT imports, asks the Hub for a faster CPU 4-bit
    # kernel at import; offline that fails, with two warnings at every start, and its own
    # kernels serve instead.
    for chatty in ("bitsandbytes", "kernels"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="finlora")
def cli() -> None:
    """finlora: fine-tune open language models on financial text, offline, with LoRA
    and other parameter-efficient methods.

    \b
    Quick start:
      finlora train configs/fpb-smollm2-lora.yaml --output runs/fpb
      finlora eval runs/fpb
      finlora predict runs/fpb "Operating profit rose to EUR 13.1 mn."
    """
    _quiet_libraries()


for _command in (train, compare, demo, eval_, predict, analyze, export, serve, generate, chat,
                 models, data, bench):  # fmt: skip
    cli.add_command(_command)


def _terminated(signum: int, frame: Any) -> None:
    if under_launcher():
        # The --nproc launcher stops the other processes once one fails, and reports that
        # failure itself: a stopped process's "aborted" would be a second, misleading line.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
    raise KeyboardInterrupt  # so a `kill` cleans up as Ctrl-C does (partial files, new runs)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(prog_name="finlora", standalone_mode=False)
    except FinloraError as exc:
        if not leave_error(str(exc)):  # under `--nproc`, the launcher prints it once
            echo_err(f"finlora: error: {exc}")
        sys.exit(2)
    except click.exceptions.Abort:
        echo_err("finlora: aborted")
        sys.exit(STOPPED)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `finlora` alone: the help, as for --help
        sys.exit(exc.exit_code)
    except click.exceptions.UsageError as exc:
        # One line, as for every other mistake, with where to look instead of the usage text.
        command = exc.ctx.command_path if exc.ctx is not None else "finlora"
        echo_err(f"finlora: error: {exc.format_message()} (see {command} --help)")
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OSError as exc:
        # A path the system refuses (a name too long, a folder that cannot be written): one
        # line naming it, as for every other mistake.
        where = f"{exc.filename}: " if exc.filename else ""
        echo_err(f"finlora: error: {where}{exc.strerror or exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        echo_err("finlora: interrupted")
        sys.exit(STOPPED)
