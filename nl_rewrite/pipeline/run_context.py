"""What every stage of a run reads: the run's context (config, model, coder, explain-split latent cache, output
folder), the windows it draws, and the two reference conditions every recovery is measured between."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

from nl_rewrite.errors import CheckpointError
from nl_rewrite.pipeline.conditions import Planned, planned_baseline
from nl_rewrite.data.windows import TokenWindows, token_windows
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.model.loading import load_model, model_name, prepend_bos_for
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.pipeline.stage import StageTimes
from nl_rewrite.parallel.runner import ShardRunner
from nl_rewrite.coders.checkpoint import load_coder
from nl_rewrite.coders.sparse_coder import SparseCoder


def coder_site(cfg: RunConfig) -> str:
    """The site the run's coder writes: the MLP's output (transcoder) or the SAE's site (as its trainer places it)."""
    from nl_rewrite.coders.train import coder_sites

    return coder_sites(cfg.coder, cfg.layer, cfg.sae_site)[1]


def load_run_coder(cfg: RunConfig, model) -> SparseCoder:
    """The run's transcoder or SAE: the cached default, a quickly trained small one, or a checkpoint."""
    from nl_rewrite.coders.train import DEFAULT_CODER_RECIPE, TrainConfig, default_coder, train

    if cfg.coder_checkpoint == "default":
        return default_coder(model_name(model), cfg.layer, model=model, kind=cfg.coder, sae_site=cfg.sae_site)
    if cfg.coder_checkpoint == "small":  # the default coder's recipe (passes over each buffer, decay), smaller
        recipe = TrainConfig(model=model_name(model), layer=cfg.layer, kind=cfg.coder, sae_site=cfg.sae_site,
                             seed=cfg.seed, **DEFAULT_CODER_RECIPE)
        small = dataclasses.replace(recipe, width=cfg.width, tokens=cfg.train_tokens)
        return train(small, model=model)  # cached in a folder named by its settings
    coder = load_coder(cfg.coder_checkpoint, model=model)
    if coder.cfg.kind != cfg.coder or coder.cfg.write_site != coder_site(cfg):
        raise CheckpointError(f"{cfg.coder_checkpoint} is a {coder.cfg.kind} writing {coder.cfg.write_site}, but "
                              f"the run asks for a {cfg.coder} writing {coder_site(cfg)}; pass --coder and --layer "
                              "(and --sae-site) to match the checkpoint")
    return coder


def explain_cache(cfg: RunConfig) -> tuple[LatentCache, list[str]]:
    """The run's explain-split latent cache (``<out>/latents``, built if needed) and its windows' document ids."""
    model = load_model(cfg.model, cfg.placement)
    windows = windows_for(cfg, model, "explain", cfg.explain_windows)
    cache = LatentCache.build(model, load_run_coder(cfg, model), windows, Path(cfg.out) / "latents")
    return cache, windows.doc_ids


def windows_for(cfg: RunConfig, model, split: str, n: int) -> TokenWindows:
    return token_windows(model, split, window=cfg.window, max_windows=n, seed=cfg.seed,
                         prepend_bos=prepend_bos_for(cfg.model))


def window_strings(cache: LatentCache, windows: TokenWindows) -> dict[int, list[str]]:
    return {i: cache.token_strings(row.tolist()) for i, row in enumerate(windows.tokens)}


def result_options(cfg: RunConfig) -> dict:
    """The options cached results are keyed by: all but the output folder (a moved or copied run stays cached) and
    the device (a run moved to a GPU reuses what the CPU computed, as it does under another runner). A renamed
    option keys under its old name (``RunConfig.RENAMED``), so a finished run's results stay cached."""
    old_name = {new: old for old, new in RunConfig.RENAMED.items()}
    return {old_name.get(k, k): v for k, v in cfg.to_dict().items() if k not in ("out", "device")}


def code_version() -> str:
    """The installed nl_rewrite version: part of every cached result's key, so a new release never reuses them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nl_rewrite")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Context:
    """What every stage reads: the config, the model, the coder, the explain-split cache, the output folder."""

    cfg: RunConfig
    model: object
    coder: SparseCoder
    """The run's transcoder, or SAE under ``--coder sae``."""
    cache: LatentCache
    out: Path
    stages: StageTimes
    runner: ShardRunner
    """Where the sharded stages run (this process, or Ray workers)."""


def heldout_windows(cfg: RunConfig, n: int) -> list[int]:
    return sorted(random.Random(cfg.seed + 1).sample(range(n), min(cfg.lexical_calib_windows, n - 1)))


@dataclass(frozen=True)
class RunMaterials:
    """The run a block of conditions belongs to: its subject model and coder (what every baseline is built from)."""

    ctx: Context

    @property
    def model(self):
        return self.ctx.model

    @property
    def coder(self) -> SparseCoder:
        return self.ctx.coder


def reference_planned(cfg: RunConfig, site: str) -> list[Planned]:
    """The two conditions every recovery fraction is measured between: the coder itself and zero-latents."""
    return [planned_baseline(cfg.coder, cfg.layer, cfg.seed, site, 1.0, cfg.coder),
            planned_baseline("zero_latents", cfg.layer, cfg.seed, site, 0.0, "no active latents")]
