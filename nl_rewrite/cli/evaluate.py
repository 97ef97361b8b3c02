"""``nl-rewrite evaluate``: CE and KL deltas of baseline replacements of one MLP, with CIs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from nl_rewrite.cli.parsing import add_command
from nl_rewrite import io
from nl_rewrite.coders.train import DEFAULT_LAYER
from nl_rewrite.data.windows import Split
from nl_rewrite.pipeline.conditions import CONDITIONS
from nl_rewrite.evaluation.evaluator import PositionMode


@dataclass(frozen=True)
class EvaluateConfig:
    """The model, the layer whose MLP output is replaced, the replacements, and the windows they are measured on."""

    model: str = "smollm2-135m"
    """embedded name, HF directory or .gguf path"""
    layer: int = DEFAULT_LAYER
    """layer whose MLP output is replaced"""
    replacement: tuple[str, ...] = ("zero", "mean")
    """conditions to evaluate: zero, mean, identity, transcoder, zero_latents, random_latents, or coder:PATH"""
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
        if not self.replacement:
            raise ValueError("give at least one --replacement")
        bad = [r for r in self.replacement if r not in CONDITIONS and not r.startswith("coder:")]
        if bad:
            raise ValueError(f"unknown replacement(s) {bad}; valid: {', '.join(CONDITIONS)} or coder:PATH")
        if min(self.max_windows, self.batch_size) < 1 or self.window < 2:
            raise ValueError("max_windows and batch_size must be at least 1, window at least 2")


def evaluate(cfg: EvaluateConfig) -> dict:
    from nl_rewrite.pipeline.conditions import build_condition, default_coder_loader
    from nl_rewrite.data.windows import split_manifest, token_windows
    from nl_rewrite.evaluation.evaluator import Evaluator
    from nl_rewrite.model.loading import load_model, prepend_bos_for

    model = load_model(cfg.model)
    windows = token_windows(model, cfg.split, corpus=cfg.corpus, window=cfg.window, max_windows=cfg.max_windows,
                            seed=cfg.seed, prepend_bos=prepend_bos_for(cfg.model))
    coder = default_coder_loader(model, cfg.layer)
    reps = [build_condition(name, model, cfg.layer, coder, cfg.seed) for name in cfg.replacement]
    results = Evaluator(model, windows, cfg.batch_size, cfg.positions, seed=cfg.seed).run(reps)
    print(results.table())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": asdict(cfg), **results.to_json()}
    io.write_json(out / "results.json", payload)
    # which documents were in which split, so the evaluation set can be audited
    io.write_json(out / "splits.json", split_manifest(cfg.corpus, cfg.seed))
    print(f"wrote {out / 'results.json'}")
    return payload


def add_parser(subparsers) -> None:
    add_command(subparsers, "evaluate", "CE/KL deltas of replacements of one MLP", run, {"cfg": EvaluateConfig})


def run(args) -> int:
    evaluate(args.cfg)
    return 0
