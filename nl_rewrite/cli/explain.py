"""``nl-rewrite explain``: explain N latents of a latent cache with an LLM; records go to a resumable JSONL.

Latents are picked among those firing in at least 2 windows' worth of tokens: ``--select frequent`` (default)
takes the N most frequent, ``--select random`` a seeded random sample of the alive ones.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from nl_rewrite.placement import Placement
from nl_rewrite.cli.plan import add_planned_command, explain_plan, planned
from nl_rewrite.cli.ray_option import runner_from
from nl_rewrite.interp.explain import ExplainConfig
from nl_rewrite.paths import cache_dir
from nl_rewrite.latents.sampling import SamplingConfig
from nl_rewrite.pipeline.plan import Plan, ThroughputOptions

DEFAULT_BACKEND = "embedded:smollm2-135m"


@dataclass(frozen=True)
class LLMOptions(Placement):
    """The LLM backend, its on-disk call cache, and where an embedded model runs (--device, --dtype)."""

    backend: str = DEFAULT_BACKEND
    """LLM backend: embedded[:<model>], openai[:<model>[@<base_url>]] or sglang:<model>@<server root>"""
    llm_cache: str = ""
    """sqlite cache of LLM calls; empty = <user cache>/llm_calls.sqlite; 'none' disables it"""


@dataclass(frozen=True)
class ExplainRun:
    """Which latents to explain, from which cache, into which file."""

    latents: int = 20
    """how many latents to explain"""
    select: Literal["frequent", "random"] = "frequent"
    """frequent (most frequent alive latents) or random"""
    select_seed: int = 0
    """seed for --select random"""
    cache: str = ""
    """latent cache folder; empty = the default transcoder's"""
    out: str = ""
    """explanations JSONL; empty = <cache>/explanations.jsonl"""

    def __post_init__(self) -> None:
        if self.latents < 1:
            raise ValueError(f"--latents must be >= 1, got {self.latents}")


def open_cache(folder: str):
    from nl_rewrite.latents.cache import LatentCache
    from nl_rewrite.cli.cache import coder_from_arg, default_cache_folder

    return LatentCache.open(folder if folder else default_cache_folder(coder_from_arg("")))


def llm_job_cache(args: argparse.Namespace, make_plan: Callable[[ThroughputOptions], Plan]):
    """The latent cache an LLM command (explain, score) works on, once its backend spec is checked; None when only
    its plan was asked for (``--plan``: printed and written beside ``args.job.out``)."""
    from nl_rewrite.llm.factory import check_spec

    check_spec(args.llm.backend)
    if planned(args, make_plan, Path(args.job.out).parent if args.job.out else Path(".")):
        return None
    return open_cache(args.job.cache)


def make_llm(opts: LLMOptions):
    """The backend named by ``opts.backend``, wrapped in the on-disk call cache."""
    from nl_rewrite.llm.factory import make_backend

    path = None if opts.llm_cache == "none" else Path(opts.llm_cache or cache_dir() / "llm_calls.sqlite")
    return make_backend(opts.backend, path, opts.placement)


def run(args: argparse.Namespace) -> int:
    from nl_rewrite.interp.explain import explain_latents
    from nl_rewrite.latents.sampling import select_latents

    job: ExplainRun = args.job
    cache = llm_job_cache(args, lambda opts: explain_plan(args, opts))
    if cache is None:
        return 0
    latents = select_latents(cache, job.latents, job.select, job.select_seed)
    out = Path(job.out) if job.out else cache.folder / "explanations.jsonl"
    with runner_from(args) as runner:
        records = explain_latents(make_llm(args.llm), cache, latents, args.explain, args.sampling, out, runner=runner)
    failed = [r for r in records if not r.ok]
    print(f"{len(records) - len(failed)} explanations, {len(failed)} failed → {out}")
    for r in records[:10]:
        print(f"  latent {r.latent}: {r.text if r.ok else 'FAILED: ' + str(r.error)}")
    return 0


def add_parser(subparsers) -> None:
    add_planned_command(subparsers, "explain", "explain latents with an LLM", run,
                        {"job": ExplainRun, "explain": ExplainConfig, "sampling": SamplingConfig, "llm": LLMOptions},
                        description=__doc__)
