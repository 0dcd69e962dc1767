"""The tasks a run can have, what each run answers as once trained, and the settings a task
refuses."""

from __future__ import annotations

from typing import Any

from finlora.config.fields import check_choice, fail
from finlora.config.methods import VIRTUAL_TOKEN_METHODS
from finlora.config.preference import PreferenceSection

# classify: a label per text (scored label tokens or a head); instruct: instruction -> answer
# (Alpaca or chat records, loss on the answer tokens, generation metrics); preference: the same
# prompts with a better and a worse answer (DPO, ORPO, KTO).
TASKS = ("classify", "instruct", "preference")
# What a trained run of each task is loaded as to predict, generate, chat, serve or export: a
# preference run is an instruct run tuned further, its prompts rendered the same way.
SERVES_AS = {"classify": "classify", "instruct": "instruct", "preference": "instruct"}
# The answer-writing tasks' default template: the model's own chat template.
INSTRUCT_TEMPLATE = "chat"
GENERATIVE_TASKS = ("instruct", "preference")


def check_task(cfg: Any) -> None:
    """Refuse settings the run's task does not read (`cfg`: a RunConfig)."""
    check_choice("task", cfg.task, TASKS)
    if cfg.task in GENERATIVE_TASKS and cfg.data.sources:
        fail("data.sources", f"is for task classify (an {cfg.task} run reads data.path)")
    if cfg.task in GENERATIVE_TASKS and cfg.data.format not in ("auto", "jsonl"):
        records = "preference" if cfg.task == "preference" else "instruction"
        fail(
            "data.format",
            f"must be auto or jsonl for task {cfg.task} (got {cfg.data.format!r}); "
            f"{records} files are records in .json or .jsonl",
        )
    if cfg.train.packing:
        _check_packing(cfg)
    default = PreferenceSection()
    if cfg.task != "preference" and cfg.preference != default:
        key = next(k for k, v in vars(cfg.preference).items() if getattr(default, k) != v)
        fail(f"preference.{key}", f"is an option of task preference (task is {cfg.task})")


def _check_packing(cfg: Any) -> None:
    """Refuse train.packing where no packed sequence could be trained on. Whether the model is
    causal (a seq2seq encoder reads each prompt alone) is known only once it is loaded."""
    if cfg.task != "instruct":
        fail("train.packing", f"is for task instruct (this run is task {cfg.task})")
    if cfg.method.name in VIRTUAL_TOKEN_METHODS:
        fail(
            "train.packing",
            f"does not work with method {cfg.method.name}: its virtual tokens sit before the "
            "whole sequence, where only the first record would read them",
        )
