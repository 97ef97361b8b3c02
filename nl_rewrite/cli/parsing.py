"""The subcommands' parser: simple_parsing turns config dataclasses into options, validated while parsing.

Each field becomes an option whose ``--help`` is the field's docstring (the string literal after it). Nested
configs give dotted options (``--explain.max_tokens``); every option also has a dash variant
(``--eval-windows``, ``--explain.max-tokens``). A ``Literal`` field (also inside ``Optional`` or a tuple) takes
only its values (argparse ``choices``), a tuple field takes one or more values and may be repeated
(``--fractions 0.5 1`` = ``--fractions 0.5 --fractions 1``). Each dataclass is built while parsing, so a
``ValueError`` from its validation is a usage error (exit code 2) before any model loads.

Only simple_parsing's public API is used (``add_arguments``, ``set_defaults``, the generation modes): the options
are tightened as argparse builds them, by this module's store action, from the field types this parser recorded.
With ``defaults=``, a function of the command line gives the defaults of its dataclasses before the options are
read (``nl-rewrite run``: the preset's values and a ``--config`` file's, see :mod:`nl_rewrite.cli.run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import simple_parsing
from simple_parsing.docstring import get_attribute_docstring


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What an option needs to know about its dataclass field: its type and its docstring."""

    kind: Any
    doc: str


def field_specs(cls: type, dest: str) -> dict[str, FieldSpec]:
    """Each (nested) field of ``cls`` by the ``dest`` simple_parsing gives its option (``cfg.explain.max_tokens``)."""
    hints = typing.get_type_hints(cls)
    specs: dict[str, FieldSpec] = {}
    for f in dataclasses.fields(cls):
        kind, name = hints[f.name], f"{dest}.{f.name}"
        nested = [k for k in (kind, *typing.get_args(kind)) if dataclasses.is_dataclass(k)]
        if nested:
            specs.update(field_specs(nested[0], name))
        else:
            specs[name] = FieldSpec(kind, get_attribute_docstring(cls, f.name).docstring_below or "")
    return specs


UNIONS = (Union, types.UnionType)
"""``Optional[X]`` and ``X | None`` (what a field written ``int | None`` is under ``from __future__ import
annotations``)."""


def literal_values(kind: Any) -> tuple | None:
    """The values a ``Literal`` type allows, looking through ``Optional`` and ``tuple[..., ...]``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return args
    if origin is tuple and args:
        return literal_values(args[0])
    if origin in UNIONS:
        options = [a for a in args if a is not type(None)]
        return literal_values(options[0]) if len(options) == 1 else None
    return None


def optional_scalar(kind: Any) -> Any:
    """X when ``kind`` is ``Optional[X]`` for a single value X (not a bool, not a tuple), else None."""
    if typing.get_origin(kind) not in UNIONS:
        return None
    options = [a for a in typing.get_args(kind) if a is not type(None)]
    single = len(options) == 1 and options[0] is not bool and typing.get_origin(options[0]) is not tuple
    return options[0] if single else None


def metavar(kind: Any) -> str | None:
    """The name of the value an option takes (``int`` for ``int``, ``Optional[int]`` and ``tuple[int, ...]``;
    ``int|str`` for ``int | str``)."""
    if typing.get_origin(kind) in UNIONS:
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(options) > 1:
            return "|".join(filter(None, map(metavar, options)))
        kind = options[0]
    if typing.get_origin(kind) is tuple:
        kind = typing.get_args(kind)[0]
    return getattr(kind, "__name__", None)


def shown(default: Any) -> str:
    """A default as it is typed on the command line (``0.5 1.0``, not ``(0.5, 1.0)``)."""
    return " ".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)


def tightened(spec: FieldSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """argparse keywords for a field's option: ``Literal`` → ``choices``, an ``Optional`` scalar requires a value,
    the help is the field's docstring and ends with the default unless the docstring states it."""
    kwargs = {**kwargs, "metavar": metavar(spec.kind)}
    values = literal_values(spec.kind)
    if values and all(isinstance(v, str) for v in values):
        kwargs.update(choices=list(values), type=str, metavar=None)
    if kwargs.get("nargs") == "?" and optional_scalar(spec.kind) is not None:
        kwargs["nargs"] = None  # simple_parsing would accept a bare --eval-windows as None
    default = kwargs.get("default")
    # argparse %-formats help; docstrings written for it already say "100%%", the others need their % doubled
    text = spec.doc if "%%" in spec.doc else spec.doc.replace("%", "%%")
    if "default:" not in text and default is not argparse.SUPPRESS:  # a docstring may say what its None means
        text = f"{text} (default: {shown(default).replace('%', '%%')})".strip()
    kwargs["help"] = text
    return kwargs


def store_action(specs: Mapping[str, FieldSpec]) -> type[argparse.Action]:
    """argparse's ``store`` for a parser whose config fields are ``specs``: field options are tightened as they
    are made (:func:`tightened`), and an option taking several values extends them when given again."""

    class Store(argparse.Action):
        def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
            spec = specs.get(dest)
            if spec is not None:
                kwargs = tightened(spec, kwargs)
                option_strings = sorted(option_strings, key=lambda s: ("_" in s.rsplit(".", 1)[-1], s))
            super().__init__(option_strings, dest, **kwargs)

        def __call__(self, parser, namespace, values, option_string=None) -> None:
            current = getattr(namespace, self.dest, None)
            if self.nargs in ("*", "+") and isinstance(current, list) and current is not self.default:
                values = [*current, *values]
            setattr(namespace, self.dest, values)

    return Store


Defaults = Callable[[list[str]], dict[str, Any]]
"""A command line → the defaults of its dataclasses by dest; a ValueError or OSError is a usage error."""


class ConfigParser(simple_parsing.ArgumentParser):
    """A subcommand's parser (see the module docstring). ``defaults``, when given, is read before parsing."""

    def __init__(self, *args, defaults: Defaults | None = None, **kwargs) -> None:
        # simple_parsing keeps these three in class attributes shared by every parser: never vary them per parser
        kwargs.update(argument_generation_mode=simple_parsing.ArgumentGenerationMode.NESTED,
                      nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT,
                      add_option_string_dash_variants=simple_parsing.DashVariant.UNDERSCORE_AND_DASH)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.specs: dict[str, FieldSpec] = {}
        store = store_action(self.specs)  # reads self.specs when the options are made, after add_arguments
        self.register("action", None, store)  # what add_argument uses when no action is named
        self.register("action", "store", store)
        self.defaults = defaults
        self.defaults_read = False
        self.renamed: dict[str, str] = {}
        """An option a config no longer has (its ``RENAMED`` fields, both spellings) → the option that replaced it."""

    def add_arguments(self, dataclass: type, dest: str, **kwargs):  # type: ignore[override]
        """simple_parsing's ``add_arguments``, recording the fields' types for their options."""
        self.specs.update(field_specs(dataclass, dest))
        for old, new in getattr(dataclass, "RENAMED", {}).items():
            option = f"--{new.replace('_', '-')}"
            self.renamed.update({f"--{old}": option, f"--{old.replace('_', '-')}": option})
        return super().add_arguments(dataclass, dest=dest, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """A usage error: the reason and where the options are listed (not the whole, long usage), exit code 2."""
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")

    def read_defaults(self, args: list[str]) -> None:
        """Apply ``defaults(args)`` (once: simple_parsing makes the options from the defaults it has then)."""
        if self.defaults is None:
            return
        if self.defaults_read:
            raise RuntimeError("a ConfigParser reads its defaults in its first parse only: build a new parser")
        self.defaults_read = True
        try:
            values = self.defaults(args)
        except OSError as exc:
            self.error(f"cannot read {exc.filename}: {exc.strerror or exc}")
        except ValueError as exc:
            self.error(str(exc))
        self.set_defaults(**values)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None, attempt_to_reorder: bool = False):
        args = list(sys.argv[1:] if args is None else args)
        self.read_defaults(args)
        try:
            parsed, extras = super().parse_known_args(args, namespace, attempt_to_reorder)
        except ValueError as exc:  # a config's validation, while its dataclass is built
            self.error(str(exc))
        for option in (extra.split("=")[0] for extra in extras):
            if option in self.renamed:
                self.error(f"{option} was renamed {self.renamed[option]}")
        return parsed, extras


def add_command(subparsers, name: str, help: str, func, configs: dict[str, type], description: str | None = None):
    """A subcommand whose options are the fields of ``configs`` (dest → dataclass); ``func(args)`` runs it."""
    parser = subparsers.add_parser(name, help=help, description=description)
    for dest, cls in configs.items():
        parser.add_arguments(cls, dest=dest)
    parser.set_defaults(func=func)
    return parser
