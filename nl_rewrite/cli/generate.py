"""``nl-rewrite generate``: greedy continuations of your prompts from the clean model, the transcoder, the MLP
rewritten from lexical explanations (simulated live, on text never seen before) and zero-latents.

Uses a finished (or resumable) ``nl-rewrite run`` folder: ``--out`` and the run options must match that run
(``--config <out>/config.toml`` reads them back). Example:
``nl-rewrite generate --config runs/nl_rewrite/config.toml --prompt "The Congress shall" --new-tokens 16``.
"""

from __future__ import annotations

from pathlib import Path

from nl_rewrite.cli.run import add_run_config
from nl_rewrite.errors import NLRewriteError
from nl_rewrite.evaluation.generate import Generation
from nl_rewrite.pipeline.config import RunConfig


def continuations(cfg: RunConfig, prompts: list[str], new_tokens: int) -> list[Generation]:
    import torch

    from nl_rewrite.pipeline.stage import StageTimes
    from nl_rewrite.pipeline.experiment import rewritten_models
    from nl_rewrite.pipeline.main_arm import lexical_budget_arm
    from nl_rewrite.pipeline.run_context import Context, heldout_windows, load_run_coder
    from nl_rewrite.evaluation.generate import side_by_side
    from nl_rewrite.latents.cache import LatentCache
    from nl_rewrite.model.loading import check_layer_before_loading, load_model, prepend_bos_for
    from nl_rewrite.parallel.runner import InProcess

    cfg = cfg.resolved()
    check_layer_before_loading(cfg.model, cfg.layer)
    folder = Path(cfg.out) / "latents"
    if not (folder / "stats.safetensors").is_file():
        raise NLRewriteError(f"no latent cache in {folder}: run `nl-rewrite run --out {cfg.out}` (same options) first")
    model = load_model(cfg.model, cfg.placement)
    ctx = Context(cfg, model, load_run_coder(cfg, model), LatentCache.open(folder), Path(cfg.out), StageTimes(),
                  InProcess())
    arm = lexical_budget_arm(ctx, cfg.lexical_budget, heldout_windows(cfg, len(ctx.cache)))
    tok = model.tokenizer
    bos = [tok.bos_token_id] if prepend_bos_for(cfg.model) and tok.bos_token_id is not None else []
    ids = [torch.tensor(bos + tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return side_by_side(model, ids, rewritten_models(ctx, arm), new_tokens, ctx.cache.token_strings)


def add_parser(subparsers) -> None:
    parser = add_run_config(subparsers, "generate", help="greedy continuations: clean vs transcoder vs rewritten MLP",
                            description=__doc__)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (default: 16)")
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.new_tokens < 1:
        raise ValueError("--new-tokens must be at least 1")
    for item in continuations(args.cfg, args.prompt, args.new_tokens):
        print(f"\n{item.prompt!r}")
        for name, text in item.continuations.items():
            print(f"  {name:<28} {text!r}")
    return 0
