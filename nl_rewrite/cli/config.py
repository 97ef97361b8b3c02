"""Turn config dataclasses into argparse options: each field's ``metadata["help"]`` becomes its ``--help`` text.

Validation stays in the dataclass's ``__post_init__``; a ``ValueError`` there is reported by the CLI as a
usage error, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one option per field of ``cls``. Lists become repeatable options; bools become ``--x/--no-x``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(_option(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif origin in (list, tuple):
            inner = typing.get_args(kind)[0]
            parser.add_argument(_option(f.name), type=inner, action="append", default=None, help=help_text + " (repeatable)")
        else:
            base = [a for a in typing.get_args(kind) if a is not type(None)][0] if origin is typing.Union or \
                type(kind).__name__ == "UnionType" else kind
            parser.add_argument(_option(f.name), type=base if base in (int, float, str) else str, default=default,
                                help=help_text)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from parsed args; repeatable options left unset keep the field default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and (f.default_factory is not dataclasses.MISSING or f.default is not dataclasses.MISSING):
            continue
        values[f.name] = tuple(value) if isinstance(value, list) and isinstance(f.default, tuple) else value
    values.update(overrides)
    return cls(**values)  # type: ignore[call-arg]
