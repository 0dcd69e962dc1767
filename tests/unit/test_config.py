"""Config: defaults, YAML recipes, dotted overrides with typed values, errors that name the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from finlora.config import (
    RunConfig,
    SpeedConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    read_yaml,
    with_speed_overrides,
)
from finlora.errors import FinloraError


def error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(FinloraError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_defaults_are_the_shipped_fpb_recipe() -> None:
    """`finlora train` without a CONFIG trains what configs/fpb-smollm2-lora.yaml says."""
    recipe = Path(__file__).parents[2] / "configs" / "fpb-smollm2-lora.yaml"
    assert load_config(recipe) == load_config(None)


def test_defaults_load() -> None:
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.seed == 42
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.lora.r == 16
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.train.epochs == 1
    assert cfg.train.max_steps is None
    assert cfg.train.learning_rate == 3e-4
    assert cfg.data.labels == []


def test_shipped_recipe_loads() -> None:
    recipe = Path(__file__).parents[2] / "configs" / "fpb-smollm2-lora.yaml"
    cfg = load_config(recipe)
    assert cfg.train.learning_rate == 3e-4
    assert recipe.read_text().startswith("# finlora train ")


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "train.learning_rate=0.0001",
            "train.max_steps=null",
            "speed.group_by_length=false",
            "lora.target_modules=[q_proj,v_proj]",
            "lora.lora_dropout=0",
            "data.label_map=0=negative,1=positive",
            "model.name=/models/x=y",
            "seed=7",
        ],
    )
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.learning_rate == 1e-4 and type(cfg.train.learning_rate) is float
    assert cfg.train.max_steps is None
    assert cfg.speed.group_by_length is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    # An int where a float is wanted is converted (lossless); the result is a float.
    assert cfg.lora.lora_dropout == 0.0 and type(cfg.lora.lora_dropout) is float
    # Only the first '=' splits key from value.
    assert cfg.data.label_map == "0=negative,1=positive"
    assert cfg.model.name == "/models/x=y"
    assert cfg.seed == 7


@pytest.mark.parametrize("value", ["1e-4", "5E-05"])
def test_override_float_in_exponent_notation(value: str) -> None:
    # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string, not a number.
    cfg = load_config(None, [f"train.learning_rate={value}"])
    assert cfg.train.learning_rate == float(value)


def test_yaml_float_in_exponent_notation(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n", encoding="utf-8")
    assert load_config(path).train.learning_rate == 1e-4


def test_yaml_recipe_and_override_order(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\ntrain:\n  epochs: 5\n  batch_size: 4\n", encoding="utf-8")
    cfg = load_config(path, ["train.epochs=6"])
    assert (cfg.seed, cfg.train.epochs, cfg.train.batch_size) == (1, 6, 4)


def test_apply_overrides_copies() -> None:
    data = {"train": {"epochs": 1}}
    assert apply_overrides(data, ["train.epochs=2", "lora.r=4"]) == {
        "train": {"epochs": 2},
        "lora": {"r": 4},
    }
    assert data == {"train": {"epochs": 1}}


def test_to_yaml_round_trips() -> None:
    import yaml

    cfg = load_config(None, ["lora.target_modules=[q_proj]", "train.max_steps=9"])
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_unknown_key_names_dotted_key() -> None:
    message = error(["lora.rank=8"])
    assert message.startswith("config: unknown key 'lora.rank' (allowed: r, lora_alpha,")


def test_unknown_top_level_key() -> None:
    assert error(["trian.epochs=1"]).startswith("config: unknown key 'trian' (allowed: seed,")


def test_override_without_equals() -> None:
    assert error(["train.epochs"]) == (
        "--set 'train.epochs': expected key=value, e.g. train.epochs=3"
    )


def test_override_into_a_value_is_not_a_section(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\n", encoding="utf-8")
    assert error(["seed.x=1"], path) == "--set 'seed.x=1': 'seed' holds a value (1), not a section"
    # Without a value there to collide with, the new section fails the type check instead.
    assert error(["seed.x=1"]) == "config: seed must be an integer (got {'x': 1})"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs=abc", "config: train.epochs must be an integer (got 'abc')"),
        ("train.epochs=2.5", "config: train.epochs must be an integer (got 2.5)"),
        ("train.epochs=true", "config: train.epochs must be an integer (got True)"),
        ("train.learning_rate=fast", "config: train.learning_rate must be a number (got 'fast')"),
        ("speed.group_by_length=1", "config: speed.group_by_length must be true or false (got 1)"),
        ("model.name=3", "config: model.name must be a string (got 3)"),
        ("lora.target_modules=[q_proj, 3]", "config: lora.target_modules must be "),
        # A string is a regular expression to PEFT: one that does not compile is refused here.
        ("lora.target_modules=[", "config: lora.target_modules is not a valid regular expression"),
        ("adalora.target_modules=(q", "config: adalora.target_modules is not a valid regular"),
        ("train.max_steps=x", "config: train.max_steps must be an integer (got 'x')"),
        ("train=3", "config: train must be a mapping (got 3)"),
        ("train.learning_rate=.inf", "config: train.learning_rate must be a finite number"),
        ("lora.learning_rate=.nan", "config: lora.learning_rate must be a finite number"),
        ("train.max_grad_norm=-1", "config: train.max_grad_norm must be positive (got -1.0)"),
        ("train.max_grad_norm=0", "config: train.max_grad_norm must be positive (got 0.0)"),
        ("seed=-5", "config: seed must be between 0 and 2**32 - 1 (got -5)"),
        ("seed=4294967296", "config: seed must be between 0 and 2**32 - 1"),
        ("data.label_column=text", "config: data.label_column must differ from data.text_column"),
    ],
)
def test_wrong_type_names_the_key(override: str, expected: str) -> None:
    assert error([override]).startswith(expected)


def test_wrong_type_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: many\n", encoding="utf-8")
    assert error([], path) == f"{path}: config: train.epochs must be an integer (got 'many')"
    # A bad --set value, or key, is the flag's, not the file's.
    assert error(["train.epochs=2", "train.batch_size=x"], path) == (
        "config: train.batch_size must be an integer (got 'x')"
    )
    assert error(["train.bogus=1"], path).startswith("config: unknown key 'train.bogus'")
    assert error([], tmp_path) == f"{tmp_path}: is a directory, not a YAML config file"


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\ntrain:\n  epochs: [1, 2\n  batch_size: 4\n", encoding="utf-8")
    message = error([], path)
    assert message.startswith(f"{path}:")
    line = int(message[len(str(path)) + 1 :].split(":", 1)[0])
    assert line in (3, 4)
    assert "malformed YAML" in message


def test_empty_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n", encoding="utf-8")
    assert error([], path) == f"{path}: file is empty"


def test_missing_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert error([], path) == f"{path}: no such file"


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    assert error([], path) == f"{path}: expected a mapping of sections at the top level"


def test_yaml_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"seed: 1\nmodel:\n  name: \xe9\x81\x00\n")
    assert error([], path) == f"{path}: not UTF-8 text"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.name= ", "model.name"),
        ("data.format=xml", "data.format"),
        ("data.agreement=90", "data.agreement"),
        ("data.test_fraction=0", "data.test_fraction"),
        ("data.test_fraction=1", "data.test_fraction"),
        ("data.val_fraction=-0.1", "data.val_fraction"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("data.synthetic_size=29", "data.synthetic_size"),
        ("data.max_length=7", "data.max_length"),
        ("data.labels=[a,b,a]", "data.labels"),
        ("lora.r=0", "lora.r"),
        ("lora.lora_alpha=0", "lora.lora_alpha"),
        ("lora.lora_dropout=1", "lora.lora_dropout"),
        ("lora.lora_dropout=-0.5", "lora.lora_dropout"),
        ("lora.bias=some", "lora.bias"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.grad_accum=-1", "train.grad_accum"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("train.log_every=0", "train.log_every"),
        ("speed.eval_batch_size=0", "speed.eval_batch_size"),
        ("speed.gradient_checkpointing_every=0", "speed.gradient_checkpointing_every"),
        ("train.max_steps=0", "train.max_steps"),
        ("speed.threads=0", "speed.threads"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.weight_decay=-0.01", "train.weight_decay"),
        ("train.warmup_ratio=1", "train.warmup_ratio"),
        ("train.device=tpu", "train.device"),
        ("train.precision=fp16", "train.precision"),
    ],
)
def test_range_error_names_the_key(override: str, key: str) -> None:
    assert error([override]).startswith(f"config: {key} ")


def test_range_error_lists_allowed_values() -> None:
    assert error(["train.precision=fp16"]) == (
        "config: train.precision must be one of auto, fp32, bf16 (got 'fp16')"
    )
    assert error(["lora.r=0"]) == "config: lora.r must be a positive integer (got 0)"
    assert error(["data.test_fraction=1"]) == (
        "config: data.test_fraction must be a fraction with 0 < x < 1 (got 1.0)"
    )


def test_max_batch_tokens_takes_a_count_auto_or_null() -> None:
    assert load_config(None, []).speed.max_batch_tokens == "auto"
    assert load_config(None, ["speed.max_batch_tokens=1024"]).speed.max_batch_tokens == 1024
    assert load_config(None, ["speed.max_batch_tokens=null"]).speed.max_batch_tokens is None
    for bad in ("8", "fast"):
        assert error([f"speed.max_batch_tokens={bad}"]) == (
            f"config: speed.max_batch_tokens must be at least 16, auto or null (got {bad})"
        )


def test_natural_yaml_spellings_of_data_options(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  agreement: 75\n  label_map:\n    0: negative\n    1: positive\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert cfg.data.agreement == "75"
    assert cfg.data.label_map == "0=negative,1=positive"
    assert load_config(None, ["data.agreement=50"]).data.agreement == "50"


def test_a_key_given_twice_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\ntrain:\n  epochs: 2\n  epochs: 3\n", encoding="utf-8")
    assert error([], path) == f"{path}:4: malformed YAML (key 'epochs' appears twice)"


# ---- help text ----------------------------------------------------------------------------------


def _sections(cls: type = RunConfig) -> list[type]:
    """RunConfig and every section under it."""
    hints = typing.get_type_hints(cls)
    found = [cls]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += _sections(hints[f.name])
    return found


@pytest.mark.parametrize("section", _sections(), ids=lambda c: c.__name__)
def test_every_field_has_help_and_every_section_a_docstring(section: type) -> None:
    doc = section.__doc__ or ""
    assert doc and not doc.startswith(f"{section.__name__}("), "no docstring"
    assert len(doc.strip().splitlines()) == 1, "the docstring is one line"
    for f in dataclasses.fields(section):
        assert f.metadata.get("help", "").strip(), f"{section.__name__}.{f.name} has no help"


# ---- the speed section and its keys' old place under train ------------------------------------


def _note_count(err: str) -> int:
    return err.count("moved to speed.* (old spelling still read)")


def test_speed_key_under_train_loads_with_one_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  epochs: 2\n  fused_lora: false\n  threads: 1\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.speed.fused_lora is False and cfg.speed.threads == 1 and cfg.train.epochs == 2
    err = capsys.readouterr().err
    assert err == (
        "finlora: config: train.fused_lora, train.threads moved to speed.* "
        "(old spelling still read)\n"
    )


def test_new_spelling_loads_without_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_config(None, ["speed.fused_lora=false"]).speed.fused_lora is False
    assert capsys.readouterr().err == ""


def test_old_spelling_in_set_overrides_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "new.yaml"
    path.write_text("speed:\n  eval_batch_size: 8\n", encoding="utf-8")
    cfg = load_config(path, ["train.eval_batch_size=4", "train.compile=true"])
    assert cfg.speed.eval_batch_size == 4 and cfg.speed.compile is True
    err = capsys.readouterr().err
    assert _note_count(err) == 1
    assert "train.eval_batch_size, train.compile" in err


def test_old_and_new_spelling_together_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("train:\n  fused_lora: false\nspeed:\n  fused_lora: true\n", encoding="utf-8")
    expected = (
        "config: train.fused_lora and speed.fused_lora are both set "
        "(train.fused_lora is the old spelling); keep speed.fused_lora"
    )
    assert error([], path) == f"{path}: {expected}"
    assert error(["train.fused_lora=false", "speed.fused_lora=true"]) == expected


def test_bad_value_under_old_spelling_names_the_new_key() -> None:
    assert error(["train.threads=0"]) == (
        "config: speed.threads must be a positive integer or null (got 0)"
    )


def test_old_run_config_with_every_speed_key_under_train_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config.yaml written before the speed section: its speed keys all under train."""
    data = RunConfig().to_dict()
    speed = data.pop("speed")
    speed.update(fused_lora=False, eval_batch_size=8, max_batch_tokens=None)
    data["train"].update(speed)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    cfg = config_from_dict(read_yaml(path))
    assert cfg.speed == SpeedConfig(**speed)
    assert cfg.train == RunConfig().train
    err = capsys.readouterr().err
    assert _note_count(err) == 1
    assert all(f"train.{key}" in err for key in speed)


def test_speed_settings_are_their_own_section() -> None:
    assert "speed" in RunConfig().to_dict()
    assert "fused_lora" not in RunConfig().to_dict()["train"]
    assert error(["speed.attention=flash"]) == (
        "config: speed.attention must be one of auto, eager, sdpa (got 'flash')"
    )


# ---- overrides for a trained run ----------------------------------------------------------------


def test_speed_overrides_for_a_trained_run() -> None:
    cfg = load_config(None, ["train.epochs=3", "lora.r=4"])
    changed = with_speed_overrides(
        cfg, ["speed.eval_batch_size=4", "speed.fuse_projections=false", "train.device=cpu"]
    )
    assert changed.speed.eval_batch_size == 4 and changed.speed.fuse_projections is False
    assert changed.train.device == "cpu"
    assert changed.train.epochs == 3 and changed.lora.r == 4
    assert with_speed_overrides(cfg, ["train.precision=fp32"]).train.precision == "fp32"
    assert with_speed_overrides(cfg, []) == cfg
    assert cfg.speed.eval_batch_size == 32  # the run's own config is left alone


@pytest.mark.parametrize("item", ["data.path=x.csv", "train.epochs=2", "lora.r=4", "seed=1"])
def test_speed_overrides_refuse_what_the_run_learned_from(item: str) -> None:
    with pytest.raises(FinloraError) as err:
        with_speed_overrides(RunConfig(), [item])
    assert str(err.value) == (
        f"--set {item}: only speed.* settings (and train.device, train.precision) "
        "can change for a trained run"
    )


def test_speed_overrides_are_validated() -> None:
    with pytest.raises(FinloraError, match=r"^config: speed.eval_batch_size must be a positive"):
        with_speed_overrides(RunConfig(), ["speed.eval_batch_size=0"])
    with pytest.raises(FinloraError, match=r"^config: unknown key 'speed.nope'"):
        with_speed_overrides(RunConfig(), ["speed.nope=1"])
    with pytest.raises(FinloraError, match=r"^config: train.device must be one of"):
        with_speed_overrides(RunConfig(), ["train.device=tpu"])


def test_speed_overrides_take_the_old_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    assert with_speed_overrides(RunConfig(), ["train.fused_lora=false"]).speed.fused_lora is False
    assert _note_count(capsys.readouterr().err) == 1
