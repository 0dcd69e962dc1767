"""Crash safety on the tiny Llama: runs SIGKILLed mid-way resume to the same adapter bytes, a
killed checkpoint write leaves the previous one, a failed write is one line, a run killed before
its first checkpoint starts again, two processes converting one GGUF take turns.

benchmarks/crash_safety.py kills runs at every kind of point; these are a few of them."""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError

import finlora.checkpoint as checkpoint_module
import finlora.train as train_module
from finlora import atomic
from finlora.checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from finlora.cli import main
from finlora.errors import FinloraError
from finlora.runs import RunDir
from finlora.train import resume_config, train

# 5 batches an epoch: checkpoints at steps 2, 4, 5 (the epoch's end) and 6 (the run's).
RUN = ["train.max_steps=6", "train.checkpoint_every=2", "train.learning_rate=0.01"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def quiet(message: str) -> None:
    pass


def adapter_bytes(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def train_args(overrides: list[str], output: Path) -> list[str]:
    sets = [arg for item in [*overrides, *RUN] for arg in ("--set", item)]
    return ["train", "--output", str(output), "--no-progress", *sets]


@pytest.fixture(scope="module")
def reference(tiny_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The adapter of the run uninterrupted (in this process: runs are byte-identical across
    processes)."""
    from finlora.config import load_config

    output = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(None, [*tiny_overrides, *RUN]), output, progress_bar=False, log=quiet)
    return adapter_bytes(output)


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., tuple[int, str]]:
    """`finlora ARGS...` through `finlora.cli.main()` in this process: (exit status, stderr)."""
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGTERM)

    def invoke(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["finlora", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            signal.signal(signal.SIGTERM, handler)
        return code, capsys.readouterr().err

    return invoke


def one_line_error(code: int, err: str, *fragments: str, logs: int = 0) -> None:
    """Exit 2 and, after `logs` lines of the run's log, one line `finlora: error: ...`."""
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == logs + 1 and lines[-1].startswith("finlora: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, err)


# The real kills: each run SIGKILLs itself ($FINLORA_KILL_AT) at the Nth pass of a point.
# (benchmarks/crash_safety.py kills at every kind of point, mid-step and mid-validation too.)
KILLS = {
    "mid-checkpoint-write": "checkpoint:2",  # step 4's checkpoint half written
    "before-first-checkpoint": "checkpoint:1",  # step 2's, the first, half written
}


@pytest.fixture(scope="module")
def killed(tiny_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run directories the kills left, by KILLS' names (the processes run side by side)."""
    root = tmp_path_factory.mktemp("killed")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "finlora.cli", *train_args(tiny_overrides, root / name)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**ENV, atomic.KILL_AT_ENV: point},
        )  # fmt: skip
        for name, point in KILLS.items()
    }
    for proc in procs.values():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, err
    return {name: root / name for name in KILLS}


# ---- a process killed mid-way, then resumed --------------------------------------------------


def test_a_run_killed_mid_checkpoint_write_resumes_to_the_same_adapter_bytes(
    killed: dict[str, Path], reference: bytes
) -> None:
    output = killed["mid-checkpoint-write"]
    checkpoints = output / "checkpoints"
    # Killed while writing step 4's checkpoint: it is a temporary directory, step 2's stands.
    assert [p.name.split(".")[1] for p in checkpoints.glob(".*.tmp")] == ["step-0000004"]
    assert latest_checkpoint(checkpoints) == checkpoints / "step-0000002"
    result = train(resume_config(output, []), output, resume=True, progress_bar=False, log=quiet)
    assert result.steps == 6
    assert adapter_bytes(output) == reference
    assert not [p.name for d in (output, checkpoints) for p in d.glob(".*")]


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_overwrite(
    killed: dict[str, Path],
    tiny_overrides: list[str],
    reference: bytes,
    cli: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = killed["before-first-checkpoint"]
    args = train_args(tiny_overrides, output)
    assert (output / "split.json").is_file()
    assert latest_checkpoint(output / "checkpoints") is None  # step 2's half written
    one_line_error(*cli(*args), str(output), "before its first checkpoint", "--overwrite")
    with monkeypatch.context() as m:
        # --resume says so before it loads any model.
        m.setattr(train_module, "_setup", lambda *a, **k: pytest.fail("loaded the model"))
        code, err = cli("train", "--resume", "--output", str(output), "--no-progress")
        one_line_error(code, err, "no checkpoint to resume from", "--overwrite")
    code, err = cli(*args, "--overwrite")
    assert code == 0, err
    assert adapter_bytes(output) == reference


# ---- a checkpoint write that is cut short ----------------------------------------------------


def small_checkpoint(directory: Path, step: int) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(directory, model, optimizer, scheduler, Progress(step, 0, step))


def test_latest_checkpoint_passes_over_half_written_ones(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    small_checkpoint(checkpoints / "step-0000002", 2)
    small_checkpoint(checkpoints / "step-0000010", 10)
    # Killed mid-write: a temporary directory with one file of three.
    half = checkpoints / ".step-0000012.k1ll3d00.tmp"
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"\0" * 8)
    # Cut short by a full disk: nothing changes at the target.
    target = checkpoints / "step-0000014"
    with (
        pytest.raises(FinloraError, match="step-0000014: cannot write \\(No space left"),
        atomic.write_errors(target),
        atomic.atomic_dir(target),
    ):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not target.exists()
    # An older checkpoint whose removal was cut short (and a step past 9,999,999 sorts last).
    (checkpoints / "step-0000010" / "optimizer.safetensors").unlink()
    small_checkpoint(checkpoints / "step-12345678", 12345678)
    assert latest_checkpoint(checkpoints) == checkpoints / "step-12345678"
    (checkpoints / "step-12345678" / "state.json").unlink()
    assert latest_checkpoint(checkpoints) == checkpoints / "step-0000002"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert load_checkpoint(checkpoints / "step-0000002", model, optimizer, scheduler).step == 2
    atomic.clean_leftovers(checkpoints)
    assert not list(checkpoints.glob(".*"))


def test_clean_leftovers_puts_back_a_directory_moved_aside(tmp_path: Path) -> None:
    # Killed between moving the old adapter aside and renaming the new one into its place.
    (tmp_path / ".adapter.old").mkdir()
    (tmp_path / ".adapter.old" / "w").write_text("old", encoding="utf-8")
    (tmp_path / ".adapter.abcd1234.tmp").mkdir()
    (tmp_path / ".metrics.jsonl.abcd1234.tmp").write_text("{", encoding="utf-8")
    atomic.clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (tmp_path / "adapter" / "w").read_text(encoding="utf-8") == "old"


# ---- a write that fails ------------------------------------------------------------------------


def full_disk_in_second_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors' writer fails as it does on a full disk, half-way into step 4's checkpoint."""
    calls = {"n": 0}
    real = checkpoint_module.save_file

    def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            Path(path).write_bytes(b"\0" * 64)
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        real(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)


def full_disk_in_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics file's append fails half-way, as on a full disk, at the fifth row."""
    calls = {"n": 0}
    real = RunDir.append_metrics

    def append_metrics(self: RunDir, row: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            with self.metrics.open("a", encoding="utf-8") as fh:
                fh.write('{"kind": "st')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics))
        real(self, row)

    monkeypatch.setattr(RunDir, "append_metrics", append_metrics)


@pytest.mark.parametrize(
    ("inject", "where", "left"),
    [
        (full_disk_in_second_checkpoint, "checkpoints/step-0000004", "step-0000002"),
        (full_disk_in_metrics, "metrics.jsonl", "step-0000004"),
    ],
    ids=["checkpoint", "metrics"],
)
def test_a_full_disk_is_one_line_and_leaves_a_resumable_run(
    inject: Callable[[pytest.MonkeyPatch], None],
    where: str,
    left: str,
    tiny_overrides: list[str],
    reference: bytes,
    tmp_path: Path,
    cli: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = tmp_path / "run"
    with monkeypatch.context() as m:
        inject(m)
        code, err = cli(*train_args(tiny_overrides, output))
    message = f"{output / where}: cannot write (No space left on device)"
    one_line_error(code, err, message, logs=2)  # the data and the model, then the error
    checkpoints = output / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == [left]
    assert not list(output.glob(".*"))
    assert len(RunDir(output).read_metrics()) == 4  # whole rows only: steps 1 to 4
    code, err = cli("train", "--resume", "--output", str(output), "--no-progress")
    assert code == 0, err
    assert adapter_bytes(output) == reference


def limit_file_size() -> None:
    """A real write error from the kernel: files past 4 KiB are refused (EFBIG), as a full disk
    refuses them (SIGXFSZ ignored, so that the write fails rather than the process). Set in the
    child only: the limit applies to every file a process writes, pytest's own output included."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_any_write_error_is_one_finlora_error_and_leaves_no_run(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "finlora.cli", *train_args(tiny_overrides, output)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        preexec_fn=limit_file_size,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert re.search(r"tokenizer: cannot write \(File too large\)$", last), done.stderr
    assert "Traceback" not in done.stderr
    assert not output.exists()  # before its first checkpoint: nothing to resume, nothing kept


# ---- two processes converting one GGUF --------------------------------------------------------

CONVERT = """
import logging, sys, time
from pathlib import Path
from finlora.models.loading import convert_gguf, sha256_file
logging.basicConfig(level=logging.INFO, format="%(message)s")
gguf, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
digest = sha256_file(gguf)
ready.touch()
while not go.exists():
    time.sleep(0.001)
print(convert_gguf(gguf, digest))
"""


def test_two_processes_converting_one_gguf_take_turns(
    tiny_causal_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finlora.export.gguf_writer import write_llama_gguf
    from finlora.models import load_base_model
    from finlora.models.loading import convert_gguf, sha256_file

    tiny = AutoModelForCausalLM.from_pretrained(tiny_causal_dir)
    gguf = tmp_path / "tiny.gguf"
    write_llama_gguf(tiny, AutoTokenizer.from_pretrained(tiny_causal_dir), gguf, "f32")
    home, ready, go = tmp_path / "home", tmp_path / "ready", tmp_path / "go"
    monkeypatch.setenv("FINLORA_HOME", str(home))
    other = subprocess.Popen(
        [sys.executable, "-c", CONVERT, str(gguf), str(ready), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    while not ready.exists():
        assert other.poll() is None, other.communicate()
        time.sleep(0.01)
    digest = sha256_file(gguf)
    go.touch()  # this process and the other start converting together
    with caplog.at_level("INFO", logger="finlora.models.loading"):
        cache = convert_gguf(gguf, digest)
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    assert Path(out.strip()) == cache
    logs = caplog.text + err
    assert logs.count("converting tiny.gguf") == 1, logs  # one converted, one found its cache
    assert {"config.json", "model.safetensors", "tokenizer.json", "SOURCE"} <= {
        p.name for p in cache.iterdir()
    }
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name, f"{cache.name}.lock"]
    loaded = load_base_model(str(gguf)).model.state_dict()
    for name, value in tiny.state_dict().items():
        torch.testing.assert_close(loaded[name], value, msg=name)
