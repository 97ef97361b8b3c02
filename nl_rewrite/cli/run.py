"""``nl-rewrite run``: the whole experiment (see :mod:`nl_rewrite.pipeline.experiment`); ``DESCRIPTION`` is its
--help text."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from nl_rewrite.cli.plan import add_plan_options, planned, run_plan
from nl_rewrite.cli.ray_option import add_ray_option, runner_from
from nl_rewrite.pipeline.config import PRESETS, RunConfig

DESCRIPTION = """The whole experiment; rerun the same --out to resume. A preset (--preset) sets the sizes; any option
overrides it, nested stage options included (--sampling.n_train, --explain.max_tokens, --score.batch_size,
--simulator.mode). --config FILE.toml reads options from a file (the <out>/config.toml an earlier run wrote
repeats that run); options on the command line override the file. See docs/configuration.md."""


def run_defaults(args: list[str]) -> dict[str, dict[str, Any]]:
    """The defaults of RunConfig's options for this command line.

    Presets are defaults: ``--preset`` and ``--seed`` (read here first) give the resolved preset the options start
    from, so ``--help`` shows its values and the stage options fill whole ``SamplingConfig``/``ExplainConfig``
    values, not copies whose fields may be None. A ``--config FILE.toml``'s values replace the preset's; the config
    is validated once, with the command line's options in (a file may rely on them)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for option in ("--config", "--preset", "--seed"):
        pre.add_argument(option)
    known, _ = pre.parse_known_args(args)
    given: dict[str, Any] = {}
    if known.preset in PRESETS:  # an unknown one is left to the option's choices, which refuse it
        given["preset"] = known.preset
    if known.seed is not None and known.seed.lstrip("-").isdigit():  # it seeds the preset's sampling
        given["seed"] = int(known.seed)
    values = RunConfig.toml_values(known.config, **given) if known.config else given
    preset = RunConfig(**{k: v for k, v in values.items() if k in ("preset", "seed")}).resolved()
    return {"cfg": {**{f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}, **values}}


def add_run_config(subparsers, name: str, **kwargs):
    """A subparser whose options are RunConfig's (at ``args.cfg``), ``--config`` included."""
    parser = subparsers.add_parser(name, defaults=run_defaults, **kwargs)
    parser.add_arguments(RunConfig, dest="cfg")
    parser.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,  # read by run_defaults
                        help="TOML file of options (same names and nesting: [explain] max_tokens = 32); options on the "
                             "command line override it, and the file's preset (or --preset) fills in the rest")
    return parser


def run(args: argparse.Namespace) -> int:
    from nl_rewrite.pipeline.experiment import CONFIG_FILE, run_experiment
    from nl_rewrite.pipeline.report import summary_text, write_outputs

    if planned(args, lambda opts: run_plan(args.cfg, opts), args.cfg.resolved().out):
        return 0
    with runner_from(args) as runner:  # its workers stop with the run, however it ends
        artifacts = run_experiment(args.cfg, runner)  # resolves the config (presets filled in) and records it
    cfg = artifacts.cfg
    data = write_outputs(artifacts, Path(cfg.out))
    print(summary_text(data))
    print(f"outputs in {cfg.out}: results.json results.csv ladder.png fractions.png budgets.png report.html "
          f"manifest.json {CONFIG_FILE}")
    return 0


def add_parser(subparsers) -> None:
    parser = add_run_config(subparsers, "run", help="the full rewrite experiment: explain, simulate, patch, evaluate",
                            description=DESCRIPTION)
    add_plan_options(parser)
    add_ray_option(parser)
    parser.set_defaults(func=run)
