"""Typed, frozen configuration: dataclasses loaded from and saved to YAML, validated on load.

The machinery here is generic: :func:`from_dict` builds any (nested) frozen dataclass from a plain mapping,
checking field names and types and naming the source file and the offending key on error;
:func:`to_dict` turns it back into plain YAML-able data.  Stage-specific config classes live beside the
stage that uses them and are built with these helpers.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import yaml

from histopan.errors import ConfigError

T = TypeVar("T")


#: the largest YAML file read (bytes); configs and model cards' records are a few kilobytes
MAX_YAML_BYTES = 8 * 2**20
#: the most values (mappings, lists and scalars, each counted once per place it appears) a YAML file may hold
#: once its aliases are expanded: ``*alias`` shares one object, so a few lines of nested aliases (a "billion
#: laughs" bomb) pass yaml.safe_load and then blow up whatever walks or copies the data
MAX_YAML_VALUES = 1_000_000


def check_yaml_size(data: Any, path: str | PathLike[str], limit: int = MAX_YAML_VALUES) -> None:
    """:class:`ConfigError` when ``data`` (as yaml.safe_load made it) holds more than ``limit`` values with its
    aliases expanded, or refers to itself; the walk stops at the limit, so it costs at most ``limit`` steps."""
    count = 0
    stack = [data]
    while stack:
        value = stack.pop()
        count += 1
        if count > limit:
            raise ConfigError(f"the YAML holds more than {limit:,} values once its aliases (*name) are expanded "
                              "(an alias bomb, or an alias that refers to itself)", path=path,
                              fix="write the values out instead of nesting aliases; a config is a few hundred lines")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


def load_yaml(path: str | PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` with clear errors for a missing, malformed, oversized file or one whose
    aliases expand beyond :data:`MAX_YAML_VALUES` values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found", path=p, fix="check the path")
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"the YAML file is too large ({size:,} bytes; at most {MAX_YAML_BYTES:,} are read)",
                          path=p, fix="pass the config file itself; a config is a few kilobytes")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
        check_yaml_size(data, p)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path=p, fix="correct the YAML syntax") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("not a text file", path=p, fix="pass a YAML config file") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping", path=p, value=type(data).__name__,
                          fix="write the config as 'key: value' lines")
    return data


def save_yaml(data: Any, path: str | PathLike[str]) -> None:
    """Write ``data`` (a dataclass or plain data) as YAML, keys in declaration order."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = to_dict(data)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def to_dict(obj: Any) -> Any:
    """Plain-data form of a dataclass (tuples become lists, paths strings), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, PathLike):
        return str(obj)
    return obj


def from_dict(cls: type[T], data: Any, *, source: str | PathLike[str] | None = None, where: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, validating keys and types.

    Unknown keys, missing required keys and values of the wrong type raise :class:`ConfigError` naming
    ``source`` (the file) and the dotted key.  Dataclasses may define ``__post_init__`` for range checks;
    a ``ValueError`` raised there is turned into a ConfigError with the same context.
    """
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or cls.__name__}' must be a mapping", path=source,
                          value=type(data).__name__, fix="write it as 'key: value' lines")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key '{_join(where, unknown[0])}'", path=source,
                          fix=f"valid keys here are: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = _join(where, f.name)
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key '{key}'", path=source, fix=f"add '{f.name}: ...'")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], source, key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid value in '{where or cls.__name__}': {exc}", path=source,
                          fix="see the documented ranges in the model card / README") from exc


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(tp: Any, value: Any, source: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"'{key}' may not be null", path=source)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"invalid value for '{key}'", path=source, value=value,
                              fix=f"use one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, where=key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list", path=source, value=value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"'{key}' must have {len(args)} items", path=source, value=value)
            items = [_convert(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping", path=source, value=value)
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, source, key): _convert(vt, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number", path=source, value=value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer", path=source, value=value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false", path=source, value=value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string", path=source, value=value)
        return value
    if tp is Path:
        if not isinstance(value, (str, PathLike)):
            raise ConfigError(f"'{key}' must be a path", path=source, value=value)
        return Path(value)
    return value
