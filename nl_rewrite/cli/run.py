"""``nl-rewrite run``: the whole experiment (see :mod:`nl_rewrite.pipeline.experiment`); rerun the same --out to resume."""

from __future__ import annotations

from pathlib import Path

from nl_rewrite.cli.config import add_dataclass_args, dataclass_from_args
from nl_rewrite.pipeline.config import RunConfig


def run(args) -> int:
    from nl_rewrite.pipeline.experiment import run_experiment
    from nl_rewrite.pipeline.report import summary_text, write_outputs

    cfg = dataclass_from_args(RunConfig, args)
    artifacts = run_experiment(cfg)
    data = write_outputs(artifacts, Path(cfg.out))
    print(summary_text(data))
    print(f"outputs in {cfg.out}: results.json results.csv ladder.png fractions.png budgets.png report.html "
          "manifest.json")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="the full rewrite experiment: explain, simulate, patch, evaluate")
    add_dataclass_args(parser, RunConfig)
    parser.set_defaults(func=run)
