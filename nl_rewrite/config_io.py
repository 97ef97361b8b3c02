"""Config dataclasses ⇄ TOML: tables for nested configs, arrays for tuples, every key and type checked.

``check_fields(cls, data)`` turns a parsed TOML table into constructor arguments of ``cls``: an unknown key is a
``ValueError`` naming it and the valid ones (or, for a key the class lists in its ``RENAMED`` mapping, its new
name); each value is checked against its field's type by pydantic (strict: no string is read as a number, no boolean
as an integer; an integer is a valid float), arrays becoming tuples and nested tables instances of their dataclass,
and a wrong one is a ``ValueError`` naming the key and what pydantic expected. ``to_toml`` writes a config back
(keys whose value is ``None`` are left out: TOML has no null).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import tomli_w
from pydantic import ValidationError

from nl_rewrite.typed_json import adapter, problems

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _qualified(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_keys(cls: type, hints: Mapping[str, Any], data: Mapping[str, Any], where: str) -> None:
    """Every key of ``data`` (and of its tables, for fields that are dataclasses) is a field of ``cls``: pydantic
    would drop an unknown key of a plain dataclass, and a misspelt option must not pass silently. ``hints``: the
    field types of ``cls``."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    renamed: Mapping[str, str] = getattr(cls, "RENAMED", {})
    for key, value in data.items():
        if key in renamed:
            raise ValueError(f"key {_qualified(where, key)!r} was renamed {renamed[key]!r}: rename it in the file")
        if key not in names:
            place = f"table [{where}]" if where else "the top level"
            raise ValueError(f"unknown key {_qualified(where, key)!r}; valid keys at {place}: {', '.join(names)}")
        nested = typing.get_args(hints[key]) or (hints[key],)
        table = next((kind for kind in nested if dataclasses.is_dataclass(kind)), None)
        if table is not None and isinstance(value, Mapping):
            _check_keys(table, typing.get_type_hints(table), value, _qualified(where, key))


def _checked(kind: Any, value: Any, key: str) -> Any:
    """``value`` as a ``kind``, read as JSON in pydantic's strict mode: a TOML value is a JSON value (TOML's dates
    aside, which no config holds), and JSON is the mode where an array may become a tuple and nothing else is
    coerced."""
    try:
        text = json.dumps(value)
    except TypeError:
        raise ValueError(f"{key} cannot be a {type(value).__name__} ({value!r})") from None
    try:
        return adapter(kind).validate_json(text, strict=True)
    except ValidationError as exc:
        # a JSON object is a TOML table
        raise ValueError(problems(exc, key, shown=1, inputs=True).replace("an object", "a table")) from None


def check_fields(cls: type, data: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``data`` as keyword arguments of ``cls``, every key known and every value of its field's type."""
    hints = typing.get_type_hints(cls)
    _check_keys(cls, hints, data, where)
    return {key: _checked(hints[key], value, _qualified(where, key)) for key, value in data.items()}


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
