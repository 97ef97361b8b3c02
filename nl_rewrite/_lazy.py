"""Lazy re-exports (PEP 562): a package lists its public names without importing their modules until first use.

``import nl_rewrite`` (or any subpackage) therefore imports neither torch nor a model, and a package's
``__init__`` cannot take part in an import cycle between its submodules.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the module defining it.

    A name is imported from its module on first access and then stored on the package, so later lookups are plain
    attribute reads."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


def by_module(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """``{module: (name, ...)}`` → ``{name: module}``; a name listed twice is a mistake."""
    out: dict[str, str] = {}
    for module, names in table.items():
        for name in names:
            if name in out:
                raise ValueError(f"{name!r} is exported from both {out[name]} and {module}")
            out[name] = module
    return out
