"""Config dataclasses ⇄ TOML: tables for nested configs, arrays for tuples, every key and type checked.

``check_fields(cls, data)`` turns a parsed TOML table into constructor arguments of ``cls``: an unknown key is a
``ValueError`` naming it and the valid ones, a value of the wrong type a ``ValueError`` naming the key and the
type expected; arrays become tuples and nested tables instances of their dataclass. ``to_toml`` writes a config
back (keys whose value is ``None`` are left out: TOML has no null).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Union

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


SCALARS: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
"""The TOML values each scalar field type accepts (an integer is a valid float)."""


def _qualified(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"an array (items: {_describe(args[0])})"
    if dataclasses.is_dataclass(kind):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _check(kind: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    wrong = ValueError(f"{key} must be {_describe(kind)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: TOML has no null, so the value is an X
            return _check(options[0], value, key)
        for option in options:
            try:
                return _check(option, value, key)
            except ValueError:
                continue
        raise wrong
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise wrong
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        item = args[0]
        return tuple(_check(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise wrong
        return kind(**check_fields(kind, value, key))
    if kind in SCALARS:
        # bool is an int subclass: true/false is accepted only where the field is a bool
        if isinstance(value, SCALARS[kind]) and (kind is bool or not isinstance(value, bool)):
            return float(value) if kind is float else value
        raise wrong
    raise TypeError(f"{key}: config files cannot hold a {kind!r}")


def check_fields(cls: type, data: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``data`` as keyword arguments of ``cls``, every key known and every value of its field's type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    checked = {}
    for key, value in data.items():
        if key not in names:
            place = f"table [{where}]" if where else "the top level"
            raise ValueError(f"unknown key {_qualified(where, key)!r}; valid keys at {place}: {', '.join(names)}")
        checked[key] = _check(hints[key], value, _qualified(where, key))
    return checked


def read_toml(cls: type, path: str | Path, complete: Callable[[dict[str, Any]], dict[str, Any]] | None = None
              ) -> dict[str, Any]:
    """The TOML file at ``path`` as checked keyword arguments of ``cls`` (see :func:`check_fields`); ``complete``
    may add to the file's table before it is checked (a run's preset fills in its stage tables)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return check_fields(cls, complete(data) if complete else data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def to_toml(config: Any, header: str = "") -> str:
    """``config`` (a dataclass instance) as TOML; ``header`` lines are written first as comments."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + tomli_w.dumps(_without_none(dataclasses.asdict(config)))
