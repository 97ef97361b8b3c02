"""Replacements from the user's own code, named on the command line.

A *plugin spec* is ``MODULE:FACTORY`` or ``MODULE:FACTORY:JSON``:

- ``MODULE`` is an importable module (``my_pkg.replacements``) or a path to a ``.py`` file (``./lowrank.py``);
- ``FACTORY`` is a callable in it (a function or a ``Replacement`` subclass) that returns a :class:`Replacement`;
- ``JSON`` (optional) is an object of keyword arguments, e.g. ``'{"rank": 64}'``.

The factory is called with the keyword arguments it declares among ``model`` (the loaded TransformerLens bridge)
and ``layer`` (the ``--layer`` being benchmarked), plus the JSON ones. Every failure (module not found,
attribute missing, bad JSON, unknown keyword, a factory that raises, a result that is not a ``Replacement``)
is a :class:`PluginError` naming the spec and what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

from nl_rewrite.errors import NLRewriteError
from nl_rewrite.replacements.base import Replacement

PROVIDED = ("model", "layer")
"""Arguments a factory receives when its signature names them."""


class PluginError(NLRewriteError, ValueError):
    """A plugin spec that cannot be turned into a replacement."""


def is_plugin_spec(spec: str) -> bool:
    """``MODULE:FACTORY[...]``: a colon whose left side is not a built-in prefix (``coder:``)."""
    head, sep, _ = spec.partition(":")
    return bool(sep) and head != "coder"


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """(module, factory name, keyword arguments) of a spec, or a ``PluginError`` saying what is malformed."""
    module, _, rest = spec.partition(":")
    factory, _, kwargs_json = rest.partition(":")
    if not module or not factory.isidentifier():
        raise PluginError(f"replacement spec {spec!r} is not MODULE:FACTORY[:JSON] (e.g. my_pkg.reps:make or "
                          "./reps.py:LowRank:'{\"rank\": 8}')")
    if not kwargs_json:
        return module, factory, {}
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as exc:
        raise PluginError(f"replacement spec {spec!r}: keyword arguments are not JSON ({exc.msg} at "
                          f"character {exc.pos}); quote them for the shell, e.g. '{{\"rank\": 8}}'") from None
    if not isinstance(kwargs, dict):
        raise PluginError(f"replacement spec {spec!r}: keyword arguments must be a JSON object, got {kwargs_json}")
    return module, factory, kwargs


def import_module(spec: str, module: str) -> ModuleType:
    """A dotted module name, or a ``.py`` file loaded under a name derived from its path."""
    if module.endswith(".py"):
        return _import_file(spec, Path(module))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and not module.startswith(exc.name):  # the plugin itself imports something missing
            raise PluginError(f"replacement spec {spec!r}: module {module!r} imports {exc.name!r}, which is not "
                              "installed") from exc
        raise PluginError(f"replacement spec {spec!r}: no module {module!r}; install it, add its folder to "
                          "PYTHONPATH, or give the file's path (./file.py:FACTORY)") from None


def _import_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"replacement spec {spec!r}: no file {path} (relative paths start at {Path.cwd()})")
    name = f"nl_rewrite_plugin_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PluginError(f"replacement spec {spec!r}: importing {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def factory_of(spec: str, module: ModuleType, name: str) -> Callable[..., object]:
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        callables = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
        what = "no attribute" if factory is None else "a non-callable"
        raise PluginError(f"replacement spec {spec!r}: module {module.__name__!r} has {what} {name!r}; "
                          f"callables defined there: {', '.join(callables) or 'none'}")
    return factory


def call_arguments(spec: str, factory: Callable[..., object], provided: dict, kwargs: dict) -> dict:
    """The spec's keyword arguments plus those of ``provided`` the factory declares; unknown ones are an error."""
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params and not takes_any)
    if unknown:
        raise PluginError(f"replacement spec {spec!r}: {getattr(factory, '__name__', factory)} takes no "
                          f"argument(s) {unknown}; it takes {', '.join(params) or 'none'}")
    return {**{k: v for k, v in provided.items() if k in params}, **kwargs}


def load_plugin(spec: str, model, layer: int) -> Replacement:
    """The replacement a plugin spec describes (see the module docstring)."""
    module_name, name, kwargs = parse_spec(spec)
    factory = factory_of(spec, import_module(spec, module_name), name)
    arguments = call_arguments(spec, factory, {"model": model, "layer": layer}, kwargs)
    try:
        made = factory(**arguments)
    except Exception as exc:
        raise PluginError(f"replacement spec {spec!r}: {name}({', '.join(arguments)}) raised "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(made, Replacement):
        raise PluginError(f"replacement spec {spec!r}: {name} returned {type(made).__name__}, not a "
                          "nl_rewrite.Replacement; return an instance of a Replacement subclass")
    return made
