"""Reading a configuration: a TOML file (with its ``base`` chain) and ``--set`` overrides, built into a
``Config`` and validated. ``load_config`` is the only way a ``Config`` is built from user input; every
problem it finds is a ``BadInput`` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pipeline.config.schema import Config
from pipeline.config.validation import validate
from pipeline.data.specs import check_model_fits
from pipeline.errors import BadInput, clip

_UNIONS = (Union, types.UnionType)  # typing.Union[...] and the X | Y of builtin types

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                training: bool = True) -> Config:
    """Read a TOML file (or the defaults when path is None), apply overrides, validate (``training``:
    for a run; a trained model's readers skip what only training needs)."""
    return config_from_dict(_read_toml(Path(path)) if path is not None else {}, overrides, training)


def e2e_overrides(sets: list[str]) -> list[str]:
    """The end-to-end network of a config: one module, the real classifier, no local context."""
    return [*sets, "local.modules=1", "local.partition=equal", "local.context=R0", "local.reconstruct=false"]


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                     training: bool = True) -> Config:
    """A config from its tables (a TOML file's, or the ``to_dict`` a run or an export recorded), with
    ``--set`` overrides applied, validated as a file's."""
    raw = {table: dict(values) if isinstance(values, dict) else values for table, values in raw.items()}
    for item in overrides:
        key, value = _parse_override(item)
        table, _, name = key.partition(".")
        if not name or "." in name:
            raise BadInput(f"--set {item!r}: keys look like table.key (for example run.mode=pipeline)")
        section = raw.setdefault(table, {})
        if not isinstance(section, dict):
            raise BadInput(f"--set {item!r}: {table!r} is not a table")
        section[name] = value
    config = _build(raw)
    validate(config, training)
    check_model_fits(config.data, config.model)
    return config


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise BadInput(f"{path}: the 'base' chain loops back to this file; remove one 'base' key")
    if not path.is_file():
        raise BadInput(f"config file {str(path)!r} does not exist; pass an existing TOML file with --config "
                       "(see configs/)")
    try:
        text = path.read_text()
    except OSError as err:
        raise BadInput(f"config file {str(path)!r} cannot be read ({err.strerror}); pass a readable TOML "
                       "file") from None
    except UnicodeDecodeError as err:
        raise BadInput(f"config file {str(path)!r} is not valid TOML: {err}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise BadInput(f"config file {str(path)!r} is not valid TOML: {err}") from None
    except (ValueError, RecursionError) as err:
        raise BadInput(f"config file {str(path)!r} cannot be read: {_beyond_limits(err)}") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise BadInput(f"{path}: 'base' must be the path of another TOML file, relative to this one")
    merged = _read_toml(path.parent / base, (*seen, path.resolve()))
    for table, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(table), dict):
            merged[table].update(values)
        else:
            merged[table] = values
    return merged


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set {item!r}: expected key=value, for example --set local.modules=4")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word such as pipeline or R1E
    except (ValueError, RecursionError) as err:
        raise BadInput(f"--set {clip(item)!r}: {_beyond_limits(err)}") from None
    return key.strip(), value


def _beyond_limits(err: ValueError | RecursionError) -> str:
    """What a parser limit tomllib hit means: Python's digit cap on ints, or its recursion limit."""
    if isinstance(err, RecursionError):
        return ("arrays or inline tables are nested too deep to read; "
                "no setting nests deeper than local.partition = [[1, 0], [2, 3]]")
    return f"a number is too long to read ({str(err).split(';')[0]}); no setting needs more than a few digits"


def _build(raw: dict[str, Any]) -> Config:
    sections = {}
    classes = get_type_hints(Config)
    for spec in dataclasses.fields(Config):
        values = raw.get(spec.name, {})
        if not isinstance(values, dict):
            raise BadInput(f"[{spec.name}] must be a table, got {type(values).__name__}")
        sections[spec.name] = _build_section(spec.name, classes[spec.name], values)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise BadInput(f"unknown config table [{unknown[0]}]; allowed tables: {', '.join(sections)}")
    return Config(**sections)


def _build_section(table: str, cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise BadInput(f"unknown config key {table}.{key}; allowed keys in [{table}]: {', '.join(allowed)}")
        kwargs[key] = _coerce(f"{table}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if get_origin(hint) in _UNIONS:
        if isinstance(value, str):  # a word: say which words are allowed, not which types
            for option in get_args(hint):
                if get_origin(option) is Literal:
                    return _coerce(name, option, value)
        for option in get_args(hint):
            try:
                return _coerce(name, option, value)
            except BadInput:
                continue
        raise BadInput(f"{name} = {value!r} has the wrong type; expected {_describe(hint)}")
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise BadInput(f"{name} = {value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value
    if get_origin(hint) is list:
        (inner,) = get_args(hint)
        if not isinstance(value, list):
            raise BadInput(f"{name} = {value!r} has the wrong type; expected {_describe(hint)}")
        return [_coerce(name, inner, item) for item in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str and isinstance(value, str):
        return value
    raise BadInput(f"{name} = {value!r} has the wrong type; expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    if get_origin(hint) in _UNIONS:
        return " or ".join(_describe(option) for option in get_args(hint))
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {_describe(get_args(hint)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


