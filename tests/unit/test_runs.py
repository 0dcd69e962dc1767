"""The run directory's records, its copy of the prompt template, and what loading a run trusts."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from finlora.config import RunConfig
from finlora.errors import FinloraError
from finlora.inference import load_run
from finlora.runs import Manifest, Run, RunDir, SplitRecord
from finlora.train import train

SENTENCES = ["Net sales fell 12 % to EUR 3.1 mn.", "Operating profit rose to EUR 13.1 mn."]
TEMPLATE = {"prompt": "News: {text}\nTone ({labels}):", "label_prefix": " "}


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def template_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]
) -> tuple[Path, Path]:
    """A run trained from inside its own folder with a custom template given by a relative path;
    returns (run directory, the template file)."""
    from finlora.config import load_config

    home = tmp_path_factory.mktemp("trainer")
    (home / "tone.json").write_text(json.dumps(TEMPLATE), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        cfg = load_config(None, [*tiny_overrides, "train.max_steps=2", "data.template=tone.json"])
        train(cfg, Path("run"), progress_bar=False, log=_quiet)
    finally:
        os.chdir(cwd)
    return home / "run", home / "tone.json"


def test_template_is_copied_and_read_from_the_run(
    template_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, template = template_run
    assert json.loads((run_dir / "template" / "tone.json").read_text()) == TEMPLATE
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["template"]
    assert Path(recorded).is_absolute() and Path(recorded) == template.resolve()
    before = load_run(run_dir).predict(SENTENCES, progress=False)
    # From another directory, after the template file was edited and then removed.
    monkeypatch.chdir(tmp_path)
    template.write_text(json.dumps({"prompt": "Other words {text} =>"}), encoding="utf-8")
    loaded = load_run(run_dir)
    assert loaded.label_codec.template.prompt == TEMPLATE["prompt"]
    assert loaded.label_codec.template.name == "tone"
    assert [p.to_dict() for p in loaded.predict(SENTENCES, progress=False)] == [
        p.to_dict() for p in before
    ]
    template.unlink()
    assert load_run(run_dir).predict(SENTENCES, progress=False)[0].label == before[0].label


def test_a_run_without_a_template_copy_still_loads(
    template_run: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    old = tmp_path / "old-run"
    shutil.copytree(template_run[0], old)
    shutil.rmtree(old / "template")
    template_run[1].write_text(json.dumps(TEMPLATE), encoding="utf-8")
    assert Run.open(old).config.data.template == str(template_run[1].resolve())
    assert load_run(old).predict(SENTENCES[:1], progress=False)[0].label


def test_split_record_round_trips_and_names_a_malformed_file(
    template_run: tuple[Path, Path], tmp_path: Path
) -> None:
    record = SplitRecord.read(template_run[0] / "split.json")
    assert record.task == "classify" and record.labels == ["negative", "neutral", "positive"]
    assert record.test and set(record.test).isdisjoint(record.train)
    copy = tmp_path / "split.json"
    record.write(copy)
    assert SplitRecord.read(copy) == record
    copy.write_text(json.dumps({**record.to_dict(), "test": [1, -2]}), encoding="utf-8")
    with pytest.raises(FinloraError, match=r"split.json: malformed \('test'"):
        SplitRecord.read(copy)


def test_manifest_reads_back(template_run: tuple[Path, Path]) -> None:
    manifest = Run.open(template_run[0]).manifest()
    assert isinstance(manifest, Manifest)
    assert manifest.steps == 2 and manifest.task == "classify" and manifest.versions["torch"]
    assert Manifest.read(template_run[0] / "nothing.json") is None


def test_test_rows_refuse_changed_data(
    tiny_cfg: Callable[..., RunConfig], tmp_path: Path, fpb_file: Path
) -> None:
    data = tmp_path / "fpb.txt"
    data.write_bytes(fpb_file.read_bytes())
    cfg = tiny_cfg("train.max_steps=1", f"data.path={data}")
    train(cfg, tmp_path / "run", progress_bar=False, log=_quiet)
    run = Run.open(tmp_path / "run")
    description, rows = run.test_rows()
    assert description.startswith("test split of") and len(rows) == len(run.split.test)
    data.write_bytes(data.read_bytes() + b"One more line .@neutral\n")
    # An opened run prepares its data once; opened again, it finds the file changed.
    run = Run.open(tmp_path / "run")
    with pytest.raises(FinloraError, match="changed since training"):
        run.test_rows()
    with pytest.raises(FinloraError, match="changed since training"):
        run.check_data_unchanged()


# ---- trust_remote_code: only from the command line ---------------------------------------------

MARKER_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("the run's own code ran")
from transformers import PreTrainedTokenizerFast
class MarkerTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _booby_trapped(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of `run_dir` whose tokenizer maps to its own Python file, and whose config asks
    for trust_remote_code, as a run handed over by someone else could."""
    import shutil

    received = tmp_path / "received"
    shutil.copytree(run_dir, received)
    tokenizer = received / "tokenizer"
    marker = str(received / "RAN")  # transformers runs a copy of the module, elsewhere
    (tokenizer / "marker.py").write_text(MARKER_MODULE.format(marker=marker), encoding="utf-8")
    config_path = tokenizer / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": [None, "marker.MarkerTokenizer"]}
    config_path.write_text(json.dumps(config), encoding="utf-8")
    run_config = yaml.safe_load((received / "config.yaml").read_text())
    run_config["model"]["trust_remote_code"] = True
    (received / "config.yaml").write_text(yaml.safe_dump(run_config), encoding="utf-8")
    return received


def test_a_received_run_cannot_turn_on_remote_code(
    template_run: tuple[Path, Path], tmp_path: Path
) -> None:
    received = _booby_trapped(template_run[0], tmp_path)
    with pytest.raises(FinloraError, match="--trust-remote-code") as caught:
        load_run(received)
    assert "\n" not in str(caught.value)
    assert not (received / "RAN").exists()


def test_trust_remote_code_from_the_caller_runs_it(
    template_run: tuple[Path, Path], tmp_path: Path
) -> None:
    received = _booby_trapped(template_run[0], tmp_path)
    # The marker's class need not load a whole model: that its file ran is the point.
    with contextlib.suppress(FinloraError, ValueError, OSError):
        load_run(received, trust_remote_code=True)
    assert (received / "RAN").exists()


def test_run_dir_is_finlora_run(template_run: tuple[Path, Path], tmp_path: Path) -> None:
    assert RunDir(template_run[0]).is_finlora_run()
    assert not RunDir(tmp_path).is_finlora_run()


def test_a_recipe_cannot_turn_on_remote_code(tmp_path: Path) -> None:
    from finlora.config import load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  trust_remote_code: true\n", encoding="utf-8")
    with pytest.raises(FinloraError, match="pass --trust-remote-code") as caught:
        load_config(recipe)
    assert "\n" not in str(caught.value)
    with pytest.raises(FinloraError, match="pass --trust-remote-code"):
        load_config(None, ["model.trust_remote_code=true"])
    # What older recipes and runs wrote still loads.
    recipe.write_text("model:\n  trust_remote_code: false\n", encoding="utf-8")
    assert load_config(recipe).model.name
