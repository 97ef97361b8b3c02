"""``nl-rewrite compare RUN_DIR...``: merge evaluations of one suite into one table, plot and HTML page.

Refuses runs whose suite fingerprints (suite, model, window tokens) differ, and says how.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nl_rewrite.cli.parsing import add_command


@dataclass(frozen=True)
class CompareConfig:
    """Where the merged table goes (the runs are positional: the folders `nl-rewrite evaluate` wrote)."""

    out: str = "runs/compare"
    """output directory for compare.md, compare.html and compare.png"""


def compare(runs: list[str], cfg: CompareConfig) -> Path:
    from nl_rewrite.evaluation.comparison import load_run, write_report

    stem = Path(cfg.out) / "compare"
    print(write_report([load_run(r) for r in runs], stem))
    print(f"wrote {stem}.md, {stem}.html and {stem}.png")
    return stem


def add_parser(subparsers) -> None:
    parser = add_command(subparsers, "compare", "merge evaluations of one suite into a table and a plot", run,
                         {"cfg": CompareConfig}, description=__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by nl-rewrite evaluate")


def run(args) -> int:
    compare(args.runs, args.cfg)
    return 0
