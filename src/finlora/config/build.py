"""Building a RunConfig from plain data: YAML files, dotted `--set key=value` overrides, the
old spelling of moved keys, and the overrides a trained run accepts."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from finlora.config.fields import fail
from finlora.config.methods import METHOD_SECTIONS
from finlora.config.sections import RunConfig
from finlora.config.speed import SpeedConfig
from finlora.config.tasks import GENERATIVE_TASKS, INSTRUCT_TEMPLATE
from finlora.errors import FinloraError

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except FinloraError as exc:
                errors.append(exc)
        if len(errors) == 1:  # `float | None`: the float's own reason ("must be finite")
            raise errors[0]
        allowed = " or ".join(_type_name(o) for o in options if o is not type(None))
        fail(key, f"must be {allowed} (got {value!r})")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            fail(key, f"must be a list (got {value!r})")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a section in a list
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what is plainly a number.
        numeric = isinstance(value, str) and _NUMBER.fullmatch(value.strip())
        if numeric or (isinstance(value, int | float) and not isinstance(value, bool)):
            number = float(value)
            if not math.isfinite(number):  # YAML's .inf and .nan: no setting wants them
                fail(key, f"must be a finite number (got {value!r})")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the annotations above are used
        raise TypeError(f"unsupported annotation {tp}")
    fail(key, f"must be {_type_name(tp)} (got {value!r})")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(prefix or "top level", f"must be a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise FinloraError(f"config: unknown key '{where}' (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def _check_method_sections(data: dict[str, Any], chosen: str) -> None:
    """Refuse options written for a method other than the chosen one: they would do nothing."""
    for name in METHOD_SECTIONS:
        options = data.get(name)
        if name == chosen or not options:
            continue
        key = f"{name}.{next(iter(options))}" if isinstance(options, dict) else name
        fail(
            key,
            f"is an option of method {name}, but method.name is {chosen} "
            f"(set method.name={name}, or drop the {name} section)",
        )


def _plain_data_options(section: Any) -> Any:
    """The data section (or one of its sources) with two natural YAML spellings turned into
    the settings' own: `agreement: 75` (an integer) and `label_map` as a mapping (`0: negative`)."""
    if not isinstance(section, dict):
        return section
    section = dict(section)
    agreement = section.get("agreement")
    if isinstance(agreement, int) and not isinstance(agreement, bool):
        section["agreement"] = str(agreement)
    if isinstance(section.get("label_map"), dict):
        section["label_map"] = ",".join(f"{k}={v}" for k, v in section["label_map"].items())
    if isinstance(section.get("sources"), list):
        section["sources"] = [_plain_data_options(s) for s in section["sources"]]
    return section


# The speed switches were `train.` settings before the `speed:` section; recipes, `--set` flags
# and the config.yaml of runs trained then still spell them so.
SPEED_KEYS = frozenset(f.name for f in dataclasses.fields(SpeedConfig))


def _note_moved(keys: list[str]) -> None:
    if keys:
        names = ", ".join(f"train.{k}" for k in keys)
        print(
            f"finlora: config: {names} moved to speed.* (old spelling still read)", file=sys.stderr
        )


def _both_spellings(key: str) -> typing.NoReturn:
    fail(
        f"train.{key}",
        f"and speed.{key} are both set (train.{key} is the old spelling); keep speed.{key}",
    )


def _moved_speed_keys(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`data` with its `train.<speed key>` settings moved under `speed`, and the keys moved."""
    train = data.get("train")
    old = [k for k in train if k in SPEED_KEYS] if isinstance(train, dict) else []
    if not old:
        return data, []
    assert isinstance(train, dict)
    speed = data.get("speed")
    if speed is not None and not isinstance(speed, dict):
        fail("speed", f"must be a mapping (got {speed!r})")
    speed = dict(speed or {})
    for key in old:
        if key in speed:
            _both_spellings(key)
        speed[key] = train[key]
    rest = {k: v for k, v in train.items() if k not in SPEED_KEYS}
    return {**data, "train": rest, "speed": speed}, old


def _moved_speed_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--set` items with `train.<speed key>` spelled `speed.<key>`, and the keys moved."""
    given = {item.partition("=")[0].strip() for item in overrides}
    result, old = [], []
    for item in overrides:
        key, eq, value = item.partition("=")
        name = key.strip().removeprefix("train.")
        if key.strip().startswith("train.") and name in SPEED_KEYS:
            if f"speed.{name}" in given:
                _both_spellings(name)
            old.append(name)
            item = f"speed.{name}{eq}{value}"
        result.append(item)
    return result, old


def _without_remote_code(data: dict[str, Any]) -> dict[str, Any]:
    """Drop `model.trust_remote_code`: running a model's own code is the loading command's
    decision (--trust-remote-code), never a file's. `false`, which older recipes and runs
    wrote, is dropped in silence; `true` is refused, so that nobody believes it took effect."""
    model = data.get("model")
    if not (isinstance(model, dict) and "trust_remote_code" in model):
        return data
    if model["trust_remote_code"] not in (False, None):
        fail(
            "model.trust_remote_code",
            "is not read from a config file or --set; pass --trust-remote-code to the command "
            "that loads the model (only if you trust its source)",
        )
    return {**data, "model": {k: v for k, v in model.items() if k != "trust_remote_code"}}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; raises FinloraError naming the offending key."""
    data_section = data.get("data")
    # A data section that is not a mapping is left for the build below to refuse in one line.
    if (
        data.get("task") in GENERATIVE_TASKS
        and isinstance(data_section, dict | None)
        and ("template" not in (data_section or {}))
    ):
        # The data section's default template is the classifier's; an instruct (or
        # preference) recipe that names none means the model's own chat template.
        data = {**data, "data": {**(data_section or {}), "template": INSTRUCT_TEMPLATE}}
    data = {**data, "data": _plain_data_options(data.get("data"))}
    data, moved = _moved_speed_keys(data)
    _note_moved(moved)
    data = _without_remote_code(data)
    cfg = typing.cast(RunConfig, _build(RunConfig, data, ""))
    _check_method_sections(data, cfg.method.name)
    return cfg


def select_method(data: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of config data for method `name`: other methods' sections are dropped.

    For `finlora compare`, which runs one recipe (often with a lora section) with every method.
    """
    result = {k: v for k, v in data.items() if k == name or k not in METHOD_SECTIONS}
    method = result.get("method")
    result["method"] = {**(method if isinstance(method, dict) else {}), "name": name}
    return result


_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise FinloraError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    if not _KEY.fullmatch(key.strip()):
        raise FinloraError(f"--set {key!r}: a key is dotted names, e.g. train.epochs")
    try:
        # YAML scalars: 3 -> int, 3e-4 -> float, true -> bool, null -> None, [a, b] -> list.
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except (ValueError, RecursionError):  # an integer of thousands of digits, deep nesting
        raise FinloraError(f"--set {key.strip()}: value too long or too deeply nested") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested dict (a copy is returned).

    Speed settings given under `train` (their old place), in `data` or in `overrides`, move
    to `speed`, with one note on stderr naming them.
    """
    result, moved = _moved_speed_keys(copy.deepcopy(data))
    overrides, flagged = _moved_speed_overrides(overrides)
    _note_moved(moved + [k for k in flagged if k not in moved])
    for item in overrides:
        parts, value = _parse_override(item)
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                # The file (or an earlier --set) gave this name a value, not a section.
                raise FinloraError(
                    f"--set {item!r}: '{part}' holds a value ({child!r}), not a section"
                )
            node = child
        node[parts[-1]] = value
    return result


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error: YAML keeps the
    last silently, so the first setting would be ignored without a word."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; raises FinloraError for a missing, empty or malformed file."""
    if path.is_dir():
        raise FinloraError(f"{path}: is a directory, not a YAML config file")
    if not path.is_file():
        raise FinloraError(f"{path}: no such file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise FinloraError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise FinloraError(f"{path}{where}: malformed YAML ({problem})") from None
    if data is None:
        raise FinloraError(f"{path}: file is empty")
    if not isinstance(data, dict):
        raise FinloraError(f"{path}: expected a mapping of sections at the top level")
    return data


def _switch_method(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set method.name=X` on a recipe written for another method: the recipe's options for
    other methods no longer apply (options given with --set still must fit X)."""
    for item in overrides:
        parts, value = _parse_override(item)
        if parts == ["method", "name"] and isinstance(value, str):
            data = select_method(data, value)
    return data


def load_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    overrides = overrides or []
    data = read_yaml(path) if path is not None else {}
    try:
        return config_from_dict(apply_overrides(_switch_method(data, overrides), overrides))
    except FinloraError as exc:
        # Name the file only for what the file set: a bad --set value is the flag's.
        keys = {item.partition("=")[0].strip() for item in overrides}
        keys |= {f"speed.{k.removeprefix('train.')}" for k in keys if k.startswith("train.")}
        message = str(exc)
        from_flags = any(
            message.startswith((f"config: {k} ", f"config: unknown key '{k}'")) for k in keys
        )
        if path is None or from_flags or message.startswith("--set "):
            raise
        raise FinloraError(f"{path}: {exc}") from None


# What a trained run's config may change: how it computes, not what it learned.
INFERENCE_KEYS = ("train.device", "train.precision")


def with_speed_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A trained run's config with `--set speed.x=value` items (and train.device,
    train.precision) applied, validated as any config.

    Raises FinloraError naming the item for any other key, or for a value its section refuses.
    """
    for item in overrides:
        key = item.partition("=")[0].strip()
        moved = key.startswith("train.") and key.removeprefix("train.") in SPEED_KEYS
        if not (key.startswith("speed.") or key in INFERENCE_KEYS or moved):
            raise FinloraError(
                f"--set {item}: only speed.* settings (and train.device, train.precision) "
                "can change for a trained run"
            )
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))
