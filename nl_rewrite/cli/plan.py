"""``--plan`` on ``run``, ``cache``, ``explain``, ``score`` and ``evaluate``: print what the command would cost and
write it as JSON, doing no LLM work (see :mod:`nl_rewrite.pipeline.plan` and docs/scaling.md).

A command adds the options with :func:`add_plan_options` (or is made by :func:`add_planned_command`, which adds
``--ray`` too) and starts its ``run`` with ``if planned(args, make_plan, default_json): return 0``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from nl_rewrite import io
from nl_rewrite.cli.parsing import add_command
from nl_rewrite.cli.ray_option import add_ray_option
from nl_rewrite.pipeline.plan import Plan, ThroughputOptions

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class PlanOptions:
    """The cost planner's options."""

    plan: bool = False
    """print the cost plan (LLM calls, prompt tokens, predictions, time per stage) and write it as JSON; no LLM work"""
    plan_json: Optional[str] = None
    """where --plan writes its JSON (default: plan.json in the command's output folder)"""
    no_probe: bool = False
    """--plan: use stated throughput assumptions instead of timing a few requests of the embedded backend"""
    calls_per_second: Optional[float] = None
    """--plan: assumed paper-protocol simulator calls per second (one prediction each); default: probe (embedded) or
    the paper's 38 per A40-second (remote)"""
    generated_tokens_per_second: Optional[float] = None
    """--plan: assumed generated tokens per second; default: probe (embedded) or a stated default (remote)"""

    def __post_init__(self) -> None:
        rates = (self.calls_per_second, self.generated_tokens_per_second)
        if any(rate is not None and rate <= 0 for rate in rates):
            raise ValueError("--calls-per-second and --generated-tokens-per-second must be > 0")

    def throughput(self) -> ThroughputOptions:
        return ThroughputOptions(probe=not self.no_probe, calls_per_second=self.calls_per_second,
                                 generated_tokens_per_second=self.generated_tokens_per_second)


def add_plan_options(parser) -> None:
    """``--plan``, ``--plan-json``, ``--no-probe`` and the throughput assumptions, at ``args.planning``."""
    parser.add_arguments(PlanOptions, dest="planning")


def add_planned_command(subparsers, name: str, help: str, func, configs: dict[str, type],
                        description: str | None = None):
    """A stage command (``cache``, ``explain``, ``score``, ``evaluate``): its config options (see
    :func:`~nl_rewrite.cli.parsing.add_command`), then ``--ray`` and the ``--plan`` options."""
    parser = add_command(subparsers, name, help, func, configs, description=description)
    add_ray_option(parser)
    add_plan_options(parser)
    return parser


def planned(args: argparse.Namespace, make_plan: Callable[[ThroughputOptions], Plan], default_dir: str | Path) -> bool:
    """With ``--plan``: build the plan, print it, write its JSON; True (the command stops there). Else False."""
    opts: PlanOptions = args.planning
    if not opts.plan:
        return False
    plan = make_plan(opts.throughput())
    path = Path(opts.plan_json) if opts.plan_json else Path(default_dir) / PLAN_FILE
    io.write_json(path, plan.to_json())
    from nl_rewrite.pipeline.plan import plan_text

    print(plan_text(plan))
    print(f"plan written to {path}")
    return True


# ---- each command's plan -----------------------------------------------------------------------------------------

def run_plan(cfg, opts: ThroughputOptions) -> Plan:
    """``nl-rewrite run``'s plan (``cfg``: a RunConfig)."""
    from nl_rewrite.pipeline.plan import choose_throughput, measure_prompts, plan_run, prompt_tokenizer

    cfg = cfg.resolved()
    tokenizer = prompt_tokenizer(cfg.llm)
    prompts = measure_prompts(tokenizer, cfg.window, cfg.sampling.n_train, cfg.explain_config(), cfg.score)
    return plan_run(cfg, prompts, choose_throughput(cfg.llm, prompts, tokenizer, cfg.window, opts))


def llm_prompts(backend: str, n_train: int, explain, score, opts: ThroughputOptions, window: int = 32):
    """(prompt sizes, throughput) for a stage command's backend (windows of the paper's 32 tokens)."""
    from nl_rewrite.pipeline.plan import choose_throughput, measure_prompts, prompt_tokenizer

    tokenizer = prompt_tokenizer(backend)
    prompts = measure_prompts(tokenizer, window, n_train, explain, score)
    return prompts, choose_throughput(backend, prompts, tokenizer, window, opts)


def explain_plan(args: argparse.Namespace, opts: ThroughputOptions) -> Plan:
    from nl_rewrite.interp.score import ScoreConfig
    from nl_rewrite.pipeline.plan import plan_explain

    prompts, throughput = llm_prompts(args.llm.backend, args.sampling.n_train, args.explain, ScoreConfig(), opts)
    return plan_explain(args.job.latents, args.explain, args.sampling, prompts, throughput)


def count_explanations(job) -> int | None:
    """Ok explanations in the file ``score`` would read, when it can be found without loading a coder."""
    from nl_rewrite.interp.explain import load_explanations

    if not job.explanations and not job.cache:
        return None
    source = Path(job.explanations) if job.explanations else Path(job.cache) / "explanations.jsonl"
    if not source.is_file():
        raise ValueError(f"score --plan counts the ok explanations, and there is no file at {source}")
    return sum(r.ok for r in load_explanations(source))


def score_plan(args: argparse.Namespace, opts: ThroughputOptions) -> Plan:
    from nl_rewrite.interp.explain import ExplainConfig
    from nl_rewrite.pipeline.plan import plan_score

    prompts, throughput = llm_prompts(args.llm.backend, args.sampling.n_train, ExplainConfig(), args.score, opts)
    return plan_score(count_explanations(args.job), args.sampling, prompts, throughput)


def cache_plan(cfg) -> Plan:
    from nl_rewrite.pipeline.plan import plan_cache

    return plan_cache(cfg.max_windows or None, cfg.window)


def evaluate_plan(cfg) -> Plan:
    from nl_rewrite.pipeline.plan import plan_evaluate

    suite = cfg.chosen_suite()
    return plan_evaluate(suite.windows, suite.window, len(cfg.replacement), len(suite.block_names()), cfg.batch_size)
