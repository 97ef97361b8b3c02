"""``--ray [ADDRESS]`` on the commands with sharded stages (run, cache, explain, score, evaluate).

Without it a stage runs in this process. ``--ray`` alone starts a local Ray cluster; ``--ray auto`` joins the
cluster ``ray start`` made on this node; ``--ray ray://host:10001`` joins a remote one. Results are the same as
in one process (see :mod:`nl_rewrite.parallel.runner`); the runner is not part of any cache key.
"""

from __future__ import annotations

import argparse

from nl_rewrite.parallel.runner import INSTALL_RAY, ShardRunner, make_runner


def add_ray_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run the heavy stages as Ray actors: no ADDRESS starts a local cluster, 'auto' joins "
                             f"this node's, ray://host:port a remote one; needs `{INSTALL_RAY}` "
                             "(default: off, this process)")


def runner_from(args: argparse.Namespace) -> ShardRunner:
    """The runner ``--ray`` asks for (this process when it is absent)."""
    return make_runner(getattr(args, "ray", None), progress=not getattr(args, "no_progress", False))
