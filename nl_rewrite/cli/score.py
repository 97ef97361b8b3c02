"""``nl-rewrite score``: detection-score explanations (balanced accuracy, AUROC) and rank the latents.

Use the same sampling options as ``nl-rewrite explain``: the held-out windows are re-drawn from them, and a
held-out window that the explainer saw is refused.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from nl_rewrite.cli.config import add_dataclass_args, dataclass_from_args
from nl_rewrite.latents.sampling import SamplingConfig
from nl_rewrite.interp.score import ScoreConfig
from nl_rewrite.cli.explain import LLMOptions, make_llm, open_cache


@dataclass
class ScoreRun:
    cache: str = field(default="", metadata={"help": "latent cache folder; empty = the default transcoder's"})
    explanations: str = field(default="", metadata={"help": "explanations JSONL; empty = <cache>/explanations.jsonl"})
    out: str = field(default="", metadata={"help": "scores JSONL; empty = <cache>/detection.jsonl"})


def run(args: argparse.Namespace) -> int:
    from nl_rewrite.interp.explain import load_explanations
    from nl_rewrite.interp.score import rank_latents, score_explanations

    job = dataclass_from_args(ScoreRun, args)
    cache = open_cache(job.cache)
    source = Path(job.explanations) if job.explanations else cache.folder / "explanations.jsonl"
    if not source.is_file():
        raise ValueError(f"no explanations at {source}; run `nl-rewrite explain` first or pass --explanations")
    out = Path(job.out) if job.out else cache.folder / "detection.jsonl"
    records = load_explanations(source)
    scores = score_explanations(make_llm(dataclass_from_args(LLMOptions, args)), cache, records,
                                dataclass_from_args(ScoreConfig, args), dataclass_from_args(SamplingConfig, args), out)
    by_latent = {s.latent: s for s in scores}
    print(f"scored {len(scores)} latents ({sum(not r.ok for r in records)} failed explanations skipped) → {out}")
    for latent in rank_latents(scores)[:10]:
        s = by_latent[latent]
        print(f"  latent {latent}: balanced accuracy {s.balanced_accuracy:.3f}, AUROC {s.auroc:.3f} "
              f"(n={s.n}) — {s.explanation}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("score", help="detection-score explanations", description=__doc__)
    for cls in (ScoreRun, ScoreConfig, SamplingConfig, LLMOptions):
        add_dataclass_args(parser, cls)
    parser.set_defaults(func=run)
