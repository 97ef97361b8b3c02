"""The subcommands' parser: simple_parsing turns config dataclasses into options, validated while parsing.

Each field becomes an option whose ``--help`` is the field's docstring (the string literal after it). Nested
configs give dotted options (``--explain.max_tokens``); every option also has a dash variant
(``--eval-windows``, ``--explain.max-tokens``). A ``Literal`` field (also inside ``Optional`` or a tuple) takes
only its values (argparse ``choices``), a tuple field takes one or more values and may be repeated
(``--fractions 0.5 1`` = ``--fractions 0.5 --fractions 1``). Each dataclass is built while parsing, so a
``ValueError`` from its validation is a usage error (exit code 2) before any model loads.

With ``config_file=<dest>``, ``--config FILE.toml`` supplies the defaults of the dataclass at ``dest`` (read and
type-checked by :mod:`nl_rewrite.config_io`); flags on the command line override the file.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any, Literal, Sequence, Union

import simple_parsing
from simple_parsing.help_formatter import TEMPORARY_TOKEN

from nl_rewrite.config_io import read_toml


class RepeatableStore(argparse.Action):
    """argparse's ``store``, except that an option taking several values extends them when given again."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        if self.nargs in ("*", "+") and isinstance(current, list) and current is not self.default:
            values = [*current, *values]
        setattr(namespace, self.dest, values)


class HelpFormatter(simple_parsing.SimpleHelpFormatter):
    """simple_parsing's formatter; a help text that already states its default is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace(TEMPORARY_TOKEN, "")
        if "%(default)" in text or "(default:" in text or action.default is argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def literal_values(kind: Any) -> tuple | None:
    """The values a ``Literal`` type allows, looking through ``Optional`` and ``tuple[..., ...]``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return args
    if origin is tuple and args:
        return literal_values(args[0])
    if origin is Union:
        options = [a for a in args if a is not type(None)]
        return literal_values(options[0]) if len(options) == 1 else None
    return None


def optional_scalar(kind: Any) -> Any:
    """X when ``kind`` is ``Optional[X]`` for a single value X (not a bool, not a tuple), else None."""
    if typing.get_origin(kind) is not Union:
        return None
    options = [a for a in typing.get_args(kind) if a is not type(None)]
    single = len(options) == 1 and options[0] is not bool and typing.get_origin(options[0]) is not tuple
    return options[0] if single else None


class ConfigParser(simple_parsing.ArgumentParser):
    """A subcommand's parser (see the module docstring).

    ``none_default`` is what a ``None`` default means in this parser's configs (shown in ``--help``, e.g. "the
    preset's"); ``config_file`` names the ``dest`` whose dataclass ``--config`` fills.
    """

    def __init__(self, *args, none_default: str | None = None, config_file: str | None = None, **kwargs) -> None:
        # simple_parsing keeps these three in class attributes shared by every parser: never vary them per parser
        kwargs.update(argument_generation_mode=simple_parsing.ArgumentGenerationMode.NESTED,
                      nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT,
                      add_option_string_dash_variants=simple_parsing.DashVariant.UNDERSCORE_AND_DASH)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", None, RepeatableStore)  # what add_argument uses when no action is named
        self.register("action", "store", RepeatableStore)
        self.none_default = none_default
        self.config_file = config_file
        self.options_ready = False
        if config_file:
            self.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                              help="TOML file of options (same names and nesting: [explain] max_tokens = 32); "
                                   "options on the command line override it")

    # ---- building the options -----------------------------------------------------------------------------

    def prepare(self, args: Sequence[str] = ()) -> None:
        """Add every dataclass field's option (simple_parsing), then tighten them: ``Literal`` → ``choices``,
        ``Optional`` scalars require a value, ``None`` defaults say what they mean."""
        self._preprocessing(args=list(args))
        if self.options_ready:
            return
        self.options_ready = True
        fields = {f.dest: f for wrapper in self._wrappers for f in wrapper.fields}
        for action in self._actions:
            field = fields.get(action.dest)
            if field is None:
                continue
            action.option_strings.sort(key=lambda s: ("_" in s.rsplit(".", 1)[-1], s))  # --eval-windows first
            values = literal_values(field.type)
            if values and all(isinstance(v, str) for v in values):
                action.choices, action.type, action.metavar = list(values), str, None
            inner = optional_scalar(field.type)
            if action.nargs == "?" and inner is not None:
                action.nargs = None  # simple_parsing would accept a bare --eval-windows as None
                action.metavar = None if action.choices else getattr(inner, "__name__", None)
            if action.default is None and self.none_default and "(default:" not in (action.help or ""):
                text = (action.help or "").replace(TEMPORARY_TOKEN, "")
                action.help = f"{text} (default: {self.none_default})".strip()

    def format_help(self) -> str:
        self.prepare()
        return super().format_help()

    def format_usage(self) -> str:
        self.prepare()
        return super().format_usage()

    def print_help(self, file=None, args: Sequence[str] | None = None) -> None:
        self.prepare(args or ())
        super().print_help(file)

    # ---- parsing ---------------------------------------------------------------------------------------------

    def error(self, message: str) -> typing.NoReturn:
        """A usage error: the reason and where the options are listed (not the whole, long usage), exit code 2."""
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")

    def read_config_file(self, args: list[str]) -> list[str]:
        """Take ``--config FILE`` out of ``args``; the file's values become the defaults of its dataclass."""
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config")
        known, rest = pre.parse_known_args(args)
        if known.config is None:
            return rest
        if self.options_ready:
            raise RuntimeError("a ConfigParser reads --config in its first parse only: build a new parser")
        wrapper = next(w for w in self._wrappers if w.dest == self.config_file)
        try:
            values = read_toml(wrapper.dataclass, known.config)
        except OSError as exc:
            self.error(f"--config: cannot read {known.config}: {exc.strerror or exc}")
        except ValueError as exc:
            self.error(f"--config: {exc}")
        self.set_defaults(**{self.config_file: values})
        return rest

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None, attempt_to_reorder: bool = False):
        args = list(sys.argv[1:] if args is None else args)
        if self.config_file:
            args = self.read_config_file(args)
        self.prepare(args)
        try:
            return super().parse_known_args(args, namespace, attempt_to_reorder)
        except ValueError as exc:  # a config's validation, while its dataclass is built
            self.error(str(exc))


def add_command(subparsers, name: str, help: str, func, configs: dict[str, type], description: str | None = None):
    """A subcommand whose options are the fields of ``configs`` (dest → dataclass); ``func(args)`` runs it."""
    parser = subparsers.add_parser(name, help=help, description=description)
    for dest, cls in configs.items():
        parser.add_arguments(cls, dest=dest)
    parser.set_defaults(func=func)
    return parser
