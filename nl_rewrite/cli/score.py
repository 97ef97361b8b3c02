"""``nl-rewrite score``: detection-score explanations (balanced accuracy, AUROC) and rank the latents.

Use the same sampling options as ``nl-rewrite explain``: the held-out windows are re-drawn from them, and a
held-out window that the explainer saw is refused.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from nl_rewrite.cli.plan import add_planned_command, score_plan
from nl_rewrite.cli.ray_option import runner_from
from nl_rewrite.latents.sampling import SamplingConfig
from nl_rewrite.interp.score import ScoreConfig
from nl_rewrite.cli.explain import LLMOptions, llm_job_cache, make_llm


@dataclass(frozen=True)
class ScoreRun:
    """Which cache and explanations to score, into which file."""

    cache: str = ""
    """latent cache folder; empty = the default transcoder's"""
    explanations: str = ""
    """explanations JSONL; empty = <cache>/explanations.jsonl"""
    out: str = ""
    """scores JSONL; empty = <cache>/detection.jsonl"""


def run(args: argparse.Namespace) -> int:
    from nl_rewrite.interp.explain import load_explanations
    from nl_rewrite.interp.score import rank_latents, score_explanations

    job: ScoreRun = args.job
    cache = llm_job_cache(args, lambda opts: score_plan(args, opts))
    if cache is None:
        return 0
    source = Path(job.explanations) if job.explanations else cache.folder / "explanations.jsonl"
    if not source.is_file():
        raise ValueError(f"no explanations at {source}; run `nl-rewrite explain` first or pass --explanations")
    out = Path(job.out) if job.out else cache.folder / "detection.jsonl"
    records = load_explanations(source)
    with runner_from(args) as runner:
        scores = score_explanations(make_llm(args.llm), cache, records, args.score, args.sampling, out, runner=runner)
    by_latent = {s.latent: s for s in scores}
    print(f"scored {len(scores)} latents ({sum(not r.ok for r in records)} failed explanations skipped) → {out}")
    for latent in rank_latents(scores)[:10]:
        s = by_latent[latent]
        print(f"  latent {latent}: balanced accuracy {s.balanced_accuracy:.3f}, AUROC {s.auroc:.3f} "
              f"(n={s.n}) — {s.explanation}")
    return 0


def add_parser(subparsers) -> None:
    add_planned_command(subparsers, "score", "detection-score explanations", run,
                        {"job": ScoreRun, "score": ScoreConfig, "sampling": SamplingConfig, "llm": LLMOptions},
                        description=__doc__)
