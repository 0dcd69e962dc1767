"""Data-parallel training: 2 processes (torchrun, gloo on the CPU) train what 1 process trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import finlora.distributed as distributed
from finlora.config import RunConfig
from finlora.distributed import Launched, World, failure_status, launch_train
from finlora.errors import FinloraError
from finlora.runs import RunDir
from finlora.train import resume_config, train


def quiet(message: str) -> None:
    pass


def launched(*command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, env=env, timeout=300
    )


def torchrun(config: Path, output: Path) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node 2 -m finlora train CONFIG`."""
    return launched(
        "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "finlora",
        "train", str(config), "--output", str(output), "--no-progress",
    )  # fmt: skip


def finlora_nproc(config: Path, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`finlora train CONFIG --nproc 2`: the same launch without knowing torchrun."""
    return launched("finlora", "train", str(config), "--output", str(output), "--nproc", "2", *args)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("step-*"))
    return load_file(str(checkpoint / "trainable.safetensors"))


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return RunDir(run_dir).read_metrics()


def assert_trained_alike(single: Path, several: Path) -> None:
    """Same weights, adapter, losses and validation figures, within float tolerance (the
    processes sum their gradients in another order than one process does)."""
    a, b = final_weights(single), final_weights(several)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-6, rtol=1e-4, msg=name)
    adapter_a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    adapter_b = load_file(str(several / "adapter" / "adapter_model.safetensors"))
    for name in adapter_a:
        torch.testing.assert_close(adapter_b[name], adapter_a[name], atol=2e-6, rtol=1e-4)
    rows_a, rows_b = rows(single), rows(several)
    assert [r["kind"] for r in rows_a] == [r["kind"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("loss", "train_loss", "val_loss", "val_accuracy"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    manifest = json.loads((several / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert json.loads((single / "manifest.json").read_text())["processes"] == 1


def launch_alike(
    cfg: RunConfig, tmp_path: Path, launcher: Callable[..., subprocess.CompletedProcess[str]]
) -> tuple[Path, Path]:
    single, several = tmp_path / "one", tmp_path / "two"
    train(cfg, single, progress_bar=False, log=quiet)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml(), encoding="utf-8")
    done = launcher(config, several)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 reports for both processes
    return single, several


def test_two_processes_train_what_one_trains(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    # 36 training rows in batches of 7: the last batch has one row, so process 1 gets none
    # of it and must still take part in the gradient sum.
    cfg = tiny_cfg("train.batch_size=7", "train.max_steps=null", "train.epochs=1", "seed=11")
    single, several = launch_alike(cfg, tmp_path, torchrun)
    assert_trained_alike(single, several)
    assert [r["kind"] for r in rows(several)].count("step") == 6
    done = torchrun(tmp_path / "config.yaml", several)  # rank 0 refuses a non-empty run
    assert done.returncode != 0 and "output directory exists" in done.stderr
    # A second epoch by --resume: every process loads rank 0's checkpoint.
    train(resume_config(single, ["train.epochs=2"]), single, resume=True, log=quiet,
          progress_bar=False)  # fmt: skip
    args = ["train", "--resume", "--output", str(several), "--set", "train.epochs=2"]
    done = launched("finlora", *args, "--nproc", "2", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_trained_alike(single, several)
    assert [r["kind"] for r in rows(several)].count("epoch") == 2


def test_two_processes_with_accumulation_on_instructions(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    data = tmp_path / "records.jsonl"
    records = [
        {"instruction": f"What does term {i} mean in finance?", "output": "A term. " * (1 + i % 4)}
        for i in range(30)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = tiny_cfg(
        "task=instruct",
        f"data.path={data}",
        "data.template=alpaca",
        "train.batch_size=5",
        "train.grad_accum=2",
        "train.max_steps=3",
        "speed.max_batch_tokens=64",
    )
    single, several = launch_alike(cfg, tmp_path, finlora_nproc)
    assert_trained_alike(single, several)
    # --nproc checks the output directory before starting any process: one line, exit 2.
    done = finlora_nproc(tmp_path / "config.yaml", several)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"finlora: error: {several}: output directory exists and is not empty "
        "(use --overwrite to replace it, or --resume to continue it)"
    ]


def test_an_error_of_every_process_is_printed_once(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    """A missing data file fails each process alike: the launcher prints its line once."""
    missing = tmp_path / "missing.txt"
    config = tmp_path / "config.yaml"
    config.write_text(tiny_cfg(f"data.path={missing}").to_yaml(), encoding="utf-8")
    done = finlora_nproc(config, tmp_path / "run")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"finlora: error: {missing}: no such file"]
    assert not (tmp_path / "run").exists()


# A finlora CLI whose command is stopped by SIGTERM while it runs, as the --nproc launcher stops
# the other processes once one has failed.
_STOPPED_PROCESS = """
import os, signal, time
import click
import finlora.cli

def work():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)

finlora.cli.cli = click.Command("work", callback=work)
finlora.cli.main()
"""


@pytest.mark.parametrize("under_launcher", [False, True])
def test_a_process_the_launcher_stops_stays_quiet(tmp_path: Path, under_launcher: bool) -> None:
    """Only the launcher reports a failure: a process it stops prints nothing (which process
    fails first is a race, and its "aborted" once came out beside the real error)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FINLORA_ERRORS_DIR", "RANK")}
    if under_launcher:
        env |= {"FINLORA_ERRORS_DIR": str(tmp_path), "RANK": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _STOPPED_PROCESS], env=env, capture_output=True, text=True
    )
    assert done.returncode == 130
    expected = [] if under_launcher else ["", "finlora: aborted"]  # alone: as for Ctrl-C
    assert done.stderr.splitlines() == expected


def test_world_from_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_env() == World(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.from_env()
    assert world == World(3, 4, 1) and world.distributed and not world.is_main
    assert world.rows(list(range(10))) == [3, 7]
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(FinloraError, match="RANK=4"):
        World.from_env()


def test_a_process_stopped_for_another_failure_does_not_set_the_status() -> None:
    """Which rank fails first is a race; the other is stopped (130) and must not win."""
    assert failure_status([130, 2]) == failure_status([2, 130]) == 2
    assert failure_status([130, 130]) == 130  # Ctrl-C: every process stopped
    assert failure_status([-15, 1]) == 1 and failure_status([]) == 1


def test_launch_train_hands_every_option_to_the_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The processes parse the same command again: none of its options may be lost."""
    seen: list[Any] = []

    def launch(processes: int, args: list[str], device: str) -> Launched:
        seen.append((processes, args, device))
        return Launched(0, [])

    monkeypatch.setattr(distributed, "launch", launch)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    config, output = tmp_path / "r.yaml", tmp_path / "run"
    launch_train(
        2, "cpu", output, config=config, overrides=["train.epochs=2"], progress_bar=False,
        trust_remote_code=True,
    )  # fmt: skip
    assert seen == [(2, ["train", str(config), "--set=train.epochs=2", "--output", str(output),
                         "--no-progress", "--trust-remote-code"], "cpu")]  # fmt: skip
    seen.clear()
    launch_train(2, "cpu", output, config=config, resume=True)
    assert seen == [(2, ["train", "--output", str(output), "--resume"], "cpu")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FinloraError, match="already started by a launcher"):
        launch_train(2, "cpu", output)
