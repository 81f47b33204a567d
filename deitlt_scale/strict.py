"""Dataclass trees built strictly from nested mappings (a YAML recipe, a grid file): an unknown
key or a value of the wrong type is a :class:`ConfigError` whose one-line message names the key
and lists the valid ones."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from deitlt_scale.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the schema; the message is one line."""


def build_strict(cls: type, tree: Any, prefix: str = "") -> Any:
    """A dataclass ``cls`` from a nested mapping with this module's rules: unknown keys and
    values of the wrong type are a :class:`ConfigError` naming ``prefix`` + the key (any
    dataclass of plain fields, e.g. the experiment grid files of ``deitlt experiment``)."""
    return _build(cls, tree, prefix)


def _build(cls: type, tree: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(tree).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in tree if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; valid keys of {where}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in tree:
            kwargs[name] = _coerce(hints[name], tree[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key} has an unsupported type {tp}")
