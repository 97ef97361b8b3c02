"""``nl-rewrite cache``: encode the explain split with a coder and store the sparse latent cache + stats."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from nl_rewrite.placement import Placement
from nl_rewrite.cli.plan import add_planned_command, cache_plan, planned
from nl_rewrite.cli.ray_option import runner_from
from nl_rewrite.data.windows import Split
from nl_rewrite.latents.cache import SAMPLE_CAP, SHARD_WINDOWS
from nl_rewrite.parallel.runner import ShardRunner
from nl_rewrite.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheConfig(Placement):
    """Which coder, model and split to encode, and where the cache goes."""

    coder: str = ""
    """coder folder (sparsify layout); empty = the default transcoder (trained first if absent)"""
    model: str = ""
    """model name; empty = the one the coder was trained on"""
    split: Split = "explain"
    """corpus split to encode"""
    corpus: str = "default"
    """corpus name or folder of .txt files"""
    window: int = 32
    """tokens per window (paper: 32)"""
    max_windows: int = 0
    """seeded sample of this many windows (0 = all)"""
    shard_windows: int = SHARD_WINDOWS
    """windows per shard (the unit of resumption)"""
    batch_size: int = 16
    """windows per forward pass"""
    sample_cap: int = SAMPLE_CAP
    """sorted activation values kept per latent"""
    out: str = ""
    """cache folder; empty = <user cache>/latents/<coder id>-<split>-w<window>"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 2 or self.shard_windows < 1 or self.batch_size < 1 or self.max_windows < 0:
            raise ValueError("window must be >= 2; shard_windows, batch_size >= 1; max_windows >= 0")


def default_cache_folder(coder, split: str = "explain", window: int = 32) -> Path:
    from nl_rewrite.latents.cache import coder_fingerprint

    return cache_dir() / "latents" / f"{coder_fingerprint(coder)}-{split}-w{window}"


def coder_from_arg(path: str, model_name: str = ""):
    """The coder at ``path``, or the default transcoder (trained if absent) when ``path`` is empty."""
    if path:
        from nl_rewrite.coders.checkpoint import load_coder

        return load_coder(path)
    from nl_rewrite.coders.train import default_transcoder

    return default_transcoder(model_name or "smollm2-135m")


def build(cfg: CacheConfig, runner: "ShardRunner | None" = None):
    from nl_rewrite.data.windows import token_windows
    from nl_rewrite.latents.cache import LatentCache
    from nl_rewrite.coders.checkpoint import load_coder
    from nl_rewrite.coders.train import default_transcoder
    from nl_rewrite.model.loading import DEFAULT_MODEL, load_model, prepend_bos_for

    if cfg.coder:
        coder = load_coder(cfg.coder)
        name = cfg.model or coder.cfg.model
        model = load_model(name, cfg.placement)
        coder.to(cfg.torch_device)  # the coder reads the model's activations where they are computed
    else:  # the default transcoder, trained (if absent) on this model, where --device says
        name = cfg.model or DEFAULT_MODEL
        model = load_model(name, cfg.placement)
        coder = default_transcoder(name, model=model)
    windows = token_windows(model, cfg.split, corpus=cfg.corpus, window=cfg.window,
                            max_windows=cfg.max_windows or None, prepend_bos=prepend_bos_for(name))
    folder = Path(cfg.out) if cfg.out else default_cache_folder(coder, cfg.split, cfg.window)
    return LatentCache.build(model, coder, windows, folder, shard_windows=cfg.shard_windows,
                             batch_size=cfg.batch_size, sample_cap=cfg.sample_cap, runner=runner)


def run(args: argparse.Namespace) -> int:
    if planned(args, lambda opts: cache_plan(args.cfg), Path(args.cfg.out or ".")):
        return 0
    with runner_from(args) as runner:
        cache = build(args.cfg, runner)
    stats = cache.stats
    alive = int((stats.count > 0).sum())
    print(f"latent cache: {cache.folder}")
    print(f"  {cache.meta.n_windows} windows × {cache.meta.window} tokens, {cache.meta.n_shards} shards "
          f"({cache.shards_built} computed now); {alive}/{cache.n_latents} latents fire at least once")
    return 0


def add_parser(subparsers) -> None:
    add_planned_command(subparsers, "cache", "cache a coder's latent activations on the explain split", run,
                        {"cfg": CacheConfig}, description=__doc__)
