"""``nl-rewrite evaluate``: CE and KL deltas of replacements (built-in or the user's own), with CIs and paired tests.

``--suite standard`` fixes splits, windows, seed and position modes so that runs can be merged by
``nl-rewrite compare``; without it, the flags define a one-block suite. Either way ``results.json`` carries the
suite's fingerprint, and ``results.md`` the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from nl_rewrite.placement import Placement
from nl_rewrite.cli.plan import add_planned_command, evaluate_plan, planned
from nl_rewrite.cli.ray_option import runner_from
from nl_rewrite import io
from nl_rewrite.coders.train import DEFAULT_LAYER
from nl_rewrite.data.windows import Split
from nl_rewrite.pipeline.conditions import CONDITIONS
from nl_rewrite.evaluation.evaluator import PositionMode
from nl_rewrite.evaluation.suite import SUITES, Suite
from nl_rewrite.model.loading import DEFAULT_MODEL
from nl_rewrite.parallel.runner import ShardRunner
from nl_rewrite.replacements.plugin import is_plugin_spec, parse_spec


@dataclass(frozen=True)
class EvaluateConfig(Placement):
    """The model, the layer whose MLP output is replaced, the replacements, and the windows they are measured on."""

    model: str = DEFAULT_MODEL
    """embedded name, HF directory or .gguf path"""
    layer: int = DEFAULT_LAYER
    """layer whose MLP output is replaced"""
    replacement: tuple[str, ...] = ("zero", "mean")
    """conditions to evaluate (repeatable): zero, mean, identity, transcoder, zero_latents, random_latents,
    coder:PATH, or your own MODULE:FACTORY[:JSON-kwargs] (see docs/replacements.md)"""
    suite: str | None = None
    """a named benchmark suite (standard, smoke) that fixes corpus, splits, window, windows, seed and positions;
    those flags are then ignored. Runs of one suite can be merged by nl-rewrite compare"""
    split: Split = "eval"
    """corpus split to evaluate on (eval, or eval_ood for out-of-domain text)"""
    corpus: str = "default"
    """corpus: default, sotu, a .txt folder or hf:<name>"""
    window: int = 64
    """tokens per window"""
    max_windows: int = 64
    """windows evaluated (seeded sample)"""
    positions: PositionMode = "all"
    """all positions, or last (the paper's protocol)"""
    batch_size: int = 8
    """windows per forward pass"""
    seed: int = 0
    """seed for splits, sampling and bootstrap"""
    out: str = "runs/evaluate"
    """output directory for results.json"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.replacement:
            raise ValueError("give at least one --replacement")
        bad = [r for r in self.replacement if r not in CONDITIONS and not r.startswith("coder:")
               and not is_plugin_spec(r)]
        if bad:
            raise ValueError(f"unknown replacement(s) {bad}; valid: {', '.join(CONDITIONS)}, coder:PATH or "
                             "MODULE:FACTORY[:JSON]")
        for spec in filter(is_plugin_spec, self.replacement):
            parse_spec(spec)  # a malformed spec fails before the model loads
        if self.suite is not None and self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; valid: {', '.join(SUITES)}")
        if min(self.max_windows, self.batch_size) < 1 or self.window < 2:
            raise ValueError("max_windows and batch_size must be at least 1, window at least 2")

    def chosen_suite(self) -> Suite:
        """The named suite, or a one-block suite made of the flags."""
        if self.suite is not None:
            return SUITES[self.suite]
        return Suite("custom", (self.split,), self.window, self.max_windows, self.seed, (self.positions,), self.corpus)


def evaluate(cfg: EvaluateConfig, runner: "ShardRunner | None" = None) -> dict:
    from nl_rewrite.pipeline.conditions import build_condition, default_coder_loader
    from nl_rewrite.data.windows import split_manifest
    from nl_rewrite.evaluation.comparison import Run, write_report
    from nl_rewrite.evaluation.suite import run_suite
    from nl_rewrite.model.loading import check_layer_before_loading, load_model, prepend_bos_for

    check_layer_before_loading(cfg.model, cfg.layer)
    suite = cfg.chosen_suite()
    out = Path(cfg.out)
    (out / "results.json").unlink(missing_ok=True)  # written last: a folder holding it is a finished evaluation
    model = load_model(cfg.model, cfg.placement)
    coder = default_coder_loader(model, cfg.layer)
    reps = [build_condition(name, model, cfg.layer, coder, suite.seed) for name in cfg.replacement]
    results = run_suite(model, cfg.model, suite, reps, prepend_bos=prepend_bos_for(cfg.model),
                        batch_size=cfg.batch_size, runner=runner)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": asdict(cfg), **results.to_json(), "complete": True}
    # which documents were in which split, so the evaluation set can be audited
    io.write_json(out / "splits.json", split_manifest(suite.corpus, suite.seed))
    report = write_report([Run(str(out), results)], out / "results")
    io.write_json(out / "results.json", payload)  # last: a full disk or a kill before it leaves no summary
    print(report)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} (fingerprint {results.fingerprint})")
    return payload


def add_parser(subparsers) -> None:
    add_planned_command(subparsers, "evaluate", "CE/KL deltas of replacements of one MLP", run, {"cfg": EvaluateConfig})


def run(args) -> int:
    if planned(args, lambda opts: evaluate_plan(args.cfg), args.cfg.out):
        return 0
    with runner_from(args) as runner:
        evaluate(args.cfg, runner)
    return 0
