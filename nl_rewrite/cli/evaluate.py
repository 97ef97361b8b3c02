"""``nl-rewrite evaluate``: CE and KL deltas of baseline replacements of one MLP, with CIs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from nl_rewrite import io
from nl_rewrite.cli.config import add_dataclass_args, dataclass_from_args
from nl_rewrite.pipeline.conditions import CONDITIONS
from nl_rewrite.coders.train import DEFAULT_LAYER


@dataclass
class EvaluateConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "embedded name, HF directory or .gguf path"})
    layer: int = field(default=DEFAULT_LAYER, metadata={"help": "layer whose MLP output is replaced"})
    replacement: tuple[str, ...] = field(default=("zero", "mean"), metadata={
        "help": f"condition to evaluate: {', '.join(CONDITIONS)} or coder:PATH"})
    split: str = field(default="eval", metadata={"help": "corpus split to evaluate on (eval or eval_ood)"})
    corpus: str = field(default="default", metadata={"help": "corpus: default, sotu, a .txt folder or hf:<name>"})
    window: int = field(default=64, metadata={"help": "tokens per window"})
    max_windows: int = field(default=64, metadata={"help": "windows evaluated (seeded sample)"})
    positions: str = field(default="all", metadata={"help": "all positions, or last (the paper's protocol)"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed for splits, sampling and bootstrap"})
    out: str = field(default="runs/evaluate", metadata={"help": "output directory for results.json"})

    def __post_init__(self) -> None:
        if not self.replacement:
            raise ValueError("give at least one --replacement")
        bad = [r for r in self.replacement if r not in CONDITIONS and not r.startswith("coder:")]
        if bad:
            raise ValueError(f"unknown replacement(s) {bad}; valid: {', '.join(CONDITIONS)} or coder:PATH")
        if self.max_windows < 1:
            raise ValueError("max_windows must be at least 1")


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
    parser = subparsers.add_parser("evaluate", help="CE/KL deltas of replacements of one MLP")
    add_dataclass_args(parser, EvaluateConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    evaluate(dataclass_from_args(EvaluateConfig, args))
    return 0
