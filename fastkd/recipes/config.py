"""Recipe configs: dataclasses whose fields are the command-line options, config-file keys and preset entries.

A field's metadata (set with `option`) gives its help, allowed values and bounds, and whether it changes a
run's results (what a resume compares). One config resolves from, lowest priority first: the dataclass
defaults, a named preset, a config file (YAML, TOML or JSON), then command-line flags.
"""
import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import typing
from typing import Any, Dict, Iterable, Optional


class ConfigError(ValueError):
    """A bad option, reported to the user as one line that names it."""


def option(default: Any, help: str, *, choices: Optional[Iterable] = None, check: Optional[str] = None,
           affects_results: bool = True):
    """A config field. check: a bound such as ">0" or ">=1" (numbers and each element of a tuple);
    choices: the allowed values (of each element, for a tuple); affects_results=False marks options a resumed
    run may change (paths, worker counts, timeouts)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "check": check,
                "affects_results": affects_results}
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The command-line spelling of a (possibly nested, dot-separated) field name: canvas.size -> --canvas-size."""
    return "--" + name.replace(".", "-").replace("_", "-")


# ---------------------------------------------------------------------------------------------- fields
def _leaves(cls, prefix: str = ""):
    """(dotted name, field, type) of every non-dataclass field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, kind


def _base_type(kind, default):
    """(scalar type, is_tuple) of an annotation: Optional[X] -> X; Tuple[X, ...] and bare tuple -> (X, True)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        return _base_type(args[0], default)
    if kind is tuple or origin is tuple:
        element = args[0] if args else (type(default[0]) if default else str)
        return element, True
    return kind, False


def _parse_scalar(kind, text: str, name: str):
    if kind is bool:
        lowered = str(text).lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{flag(name)}: expected true or false, got {text!r}")
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag(name)}: expected {kind.__name__}, got {text!r}") from None


def _coerce(name: str, kind, default, value):
    """A value from a file or the command line, converted to the field's type ("none" clears an optional one)."""
    optional = type(None) in typing.get_args(kind)
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        return None
    scalar, is_tuple = _base_type(kind, default)
    if is_tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{flag(name)}: expected a list, got {value!r}")
        return tuple(_parse_scalar(scalar, item.strip() if isinstance(item, str) else item, name) for item in items)
    if scalar is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, scalar) and not (scalar is int and isinstance(value, bool)):
        return value
    return _parse_scalar(scalar, value, name)


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per leaf field (nested dataclasses as --outer-inner), each defaulting to None (= not given)."""
    defaults = to_dict(cls())
    for name, f, kind in _leaves(cls):
        default = _get(defaults, name)
        scalar, is_tuple = _base_type(kind, default)
        meta = f.metadata
        shown = ",".join(map(str, default)) if is_tuple else default
        help_text = f"{meta.get('help', '')} (default: {shown})".strip().replace("%", "%%")
        if scalar is bool and not is_tuple:
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        choices = meta.get("choices")
        metavar = ("{" + ",".join(map(str, choices)) + "}" if choices else scalar.__name__.upper()) + (
            ",..." if is_tuple else "")
        parser.add_argument(flag(name), dest=name, type=str, default=None, metavar=metavar, help=help_text)


def given(namespace: argparse.Namespace, cls) -> Dict[str, Any]:
    """The flags of `cls` set on the command line, as a nested dict of raw strings."""
    out: Dict[str, Any] = {}
    for name, _, _ in _leaves(cls):
        value = getattr(namespace, name, None)
        if value is not None:
            _set(out, name, value)
    return out


# ---------------------------------------------------------------------------------------------- files and presets
def read_file(path: str) -> Dict[str, Any]:
    """A config file's mapping: .yaml/.yml, .toml or .json (keys as the fields, `-` or `_`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    extension = os.path.splitext(path)[1].lower()
    try:
        if extension in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("--config: YAML files need PyYAML (pip install pyyaml); TOML and JSON need "
                                  "nothing") from None
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        elif extension == ".toml":
            import tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif extension == ".json":
            with open(path) as f:
                data = json.load(f)
        else:
            raise ConfigError(f"--config: {path!r} is neither .yaml/.yml, .toml nor .json")
    except ConfigError:
        raise
    except Exception as error:  # a syntax error of any of the three formats
        raise ConfigError(f"--config: cannot parse {path!r}: {error}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of options, got {type(data).__name__}")
    return data


def resolve(cls, *layers: Dict[str, Any]):
    """cls's defaults overridden by each layer in turn (nested dicts; keys with `-` or `_`; raw or typed
    values); unknown keys are refused with the closest known names."""
    values = to_dict(cls())
    leaves = {name: (f, kind) for name, f, kind in _leaves(cls)}
    for layer in layers:
        for name, value in _flatten(layer):
            if name not in leaves:
                close = difflib.get_close_matches(name, leaves, n=3)
                hint = f"; did you mean {', '.join(flag(c) for c in close)}?" if close else ""
                raise ConfigError(f"unknown option {flag(name)}{hint}")
            f, kind = leaves[name]
            _set(values, name, _coerce(name, kind, _get(values, name), value))
    return from_dict(cls, values)


def _flatten(mapping: Dict[str, Any], prefix: str = ""):
    for key, value in mapping.items():
        name = prefix + str(key).replace("-", "_")
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


# ---------------------------------------------------------------------------------------------- validation
def validate(cfg) -> None:
    """Every field against its metadata: numbers finite, bounds (`check`) and `choices` held."""
    values = to_dict(cfg)
    for name, f, kind in _leaves(type(cfg)):
        value = _get(values, name)
        if value is None:
            continue
        choices = f.metadata.get("choices")
        items = value if isinstance(value, (tuple, list)) else (value,)
        unknown = [item for item in items if choices is not None and item not in choices]
        if unknown:
            shown = unknown if isinstance(value, (tuple, list)) else repr(value)
            raise ConfigError(f"{flag(name)}: unknown {shown}; choose from {list(choices)}")
        for item in items:
            _check_number(name, item, f.metadata)


def _check_number(name: str, value, meta) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{flag(name)} must be a finite number, got {value}")
    check = meta.get("check")
    if check:
        op = check.rstrip("0123456789.e-+")
        bound = float(check[len(op):])
        ok = {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
        if not ok:
            raise ConfigError(f"{flag(name)} must be {op} {check[len(op):]}, got {value}")


# ---------------------------------------------------------------------------------------------- dicts
def to_dict(cfg) -> Dict[str, Any]:
    """The config as nested plain containers (tuples kept), for JSON and comparison."""
    return dataclasses.asdict(cfg)


def from_dict(cls, values: Dict[str, Any]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = values[f.name]
        kwargs[f.name] = from_dict(hints[f.name], value) if dataclasses.is_dataclass(hints[f.name]) else value
    return cls(**kwargs)


def results_fields(cfg) -> Dict[str, Any]:
    """The flattened fields that change results (affects_results), JSON-ready: what a checkpoint records and a
    resume compares."""
    values = to_dict(cfg)
    return {name: _jsonable(_get(values, name)) for name, f, _ in _leaves(type(cfg))
            if f.metadata.get("affects_results", True)}


def refuse_changes(recorded: Dict[str, Any], current: Dict[str, Any], where: str) -> None:
    """ConfigError listing every field whose value differs ('seed 0 -> 5'), if any: `where` holds a run of
    other settings, which a resume would mix with this one."""
    changed = [f"{name} {_show(recorded.get(name, '<absent>'))} -> {_show(current.get(name, '<absent>'))}"
               for name in sorted(set(recorded) | set(current)) if recorded.get(name) != current.get(name)]
    if changed:
        raise ConfigError(f"{where} holds a run with other settings ({'; '.join(changed)}); resuming would mix two "
                          f"runs: pass --no-resume to start over there, or choose another --out-dir")


def render(cfg) -> str:
    """`name: value` lines, nested fields dotted: how a run prints its resolved config."""
    values = to_dict(cfg)
    return "\n".join(f"  {name}: {_show(_get(values, name))}" for name, _, _ in _leaves(type(cfg)))


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _get(values: Dict[str, Any], name: str):
    for part in name.split("."):
        values = values[part]
    return values


def _set(values: Dict[str, Any], name: str, value) -> None:
    *outer, last = name.split(".")
    for part in outer:
        values = values.setdefault(part, {})
    values[last] = value
