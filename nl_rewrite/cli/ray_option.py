"""``--ray [ADDRESS]`` on the commands with sharded stages (run, cache, explain, score, evaluate).

Without it a stage runs in this process. ``--ray`` alone (``--ray local``) starts a local Ray cluster; ``--ray
auto`` joins the cluster ``ray start`` made on this node; ``--ray ray://host:10001`` joins a remote one. Results
are the same as in one process (see :mod:`nl_rewrite.parallel.runner`); the runner is not part of any cache key.
"""

from __future__ import annotations

import argparse

from nl_rewrite.parallel.runner import INSTALL_RAY, ShardRunner, make_runner


def add_ray_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run the heavy stages as Ray actors: no ADDRESS starts a local cluster, 'auto' joins "
                             f"this node's, ray://host:port a remote one; needs `{INSTALL_RAY}` "
                             "(default: off, this process)")
    parser.add_argument("--ray-workers", type=at_least_one, default=None, metavar="N",
                        help="worker actors per stage under --ray; each holds its own copy of the model and, with the "
                             "embedded LLM, of that too (default: one per CPU of the cluster)")
    parser.add_argument("--ray-gpus-per-worker", type=non_negative, default=0.0, metavar="G",
                        help="GPUs each worker actor reserves under --ray (fractions share a GPU: 0.5 puts two workers "
                             "on one); give it with --device cuda, or Ray hides every GPU from the workers "
                             "(default: 0)")


def at_least_one(text: str) -> int:
    """argparse type: a whole number ≥ 1 (a usage error, before anything loads, otherwise)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def non_negative(text: str) -> float:
    """argparse type: a number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text!r}")
    return value


def runner_from(args: argparse.Namespace) -> ShardRunner:
    """The runner ``--ray`` asks for (this process when it is absent)."""
    return make_runner(args.ray, args.ray_workers, args.ray_gpus_per_worker)
