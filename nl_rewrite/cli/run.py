"""``nl-rewrite run``: the whole experiment (see :mod:`nl_rewrite.pipeline.experiment`); ``DESCRIPTION`` is its
--help text."""

from __future__ import annotations

import argparse
from pathlib import Path

from nl_rewrite.cli.plan import add_plan_options, planned, run_plan
from nl_rewrite.cli.ray_option import add_ray_option, runner_from
from nl_rewrite.pipeline.config import RunConfig

DESCRIPTION = """The whole experiment; rerun the same --out to resume. A preset (--preset) sets the sizes; any option
overrides it, nested stage options included (--sampling.n_train, --explain.max_tokens, --score.batch_size,
--simulator.mode). --config FILE.toml reads options from a file (the <out>/config.toml an earlier run wrote
repeats that run); options on the command line override the file. See docs/configuration.md."""
NONE_MEANS = "the preset's"
"""What a None default means in RunConfig, for --help."""


def add_run_config(subparsers, name: str, **kwargs):
    """A subparser whose options are RunConfig's (at ``args.cfg``), ``--config`` included."""
    parser = subparsers.add_parser(name, none_default=NONE_MEANS, config_file="cfg", **kwargs)
    parser.add_arguments(RunConfig, dest="cfg")
    return parser


def run(args: argparse.Namespace) -> int:
    from nl_rewrite.pipeline.experiment import CONFIG_FILE, run_experiment
    from nl_rewrite.pipeline.report import summary_text, write_outputs

    if planned(args, lambda opts: run_plan(args.cfg, opts), args.cfg.resolved().out):
        return 0
    artifacts = run_experiment(args.cfg, runner_from(args))  # resolves the config (presets filled in) and records it
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
