"""The LLM pool: the latents carrying the most output mass, explained and detection-scored by the LLM, simulated and
calibrated on explain windows, and the pool's conditions (evaluated on the first ``llm_eval_windows`` eval windows,
with their own references)."""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.interp.calibrate import Calibrator, count_fallbacks, make_calibrator
from nl_rewrite.pipeline.conditions import Planned
from nl_rewrite.interp.explain import Explanation, explain_latents
from nl_rewrite.pipeline.ladder import LexicalArm, lexical_condition, mean_active, zeroed_condition
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.replacements.base import Replacement
from nl_rewrite.replacements.oracles import OracleReplacement
from nl_rewrite.interp.selection import choose_latents, usable_pool
from nl_rewrite.replacements.simulated import NLSimulatorReplacement
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.pipeline.stage import StageTimes
from nl_rewrite.latents.sampling import select_latents
from nl_rewrite.interp.score import DetectionScore, score_explanations
from nl_rewrite.interp.simulate import Simulator
from nl_rewrite.interp.simulation_store import (SimulationQuality, SimulationRun, SimulationStore, simulate_into_store,
                                                simulation_quality)
from nl_rewrite.parallel.runner import ShardRunner
from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.pipeline.run_context import Context, RunMaterials, coder_site, reference_planned

log = logging.getLogger(__name__)


def condition_name(calibration: str, fraction: float) -> str:
    return f"sim_{calibration}_f{fraction:g}"


def output_mass(cache: LatentCache, coder: SparseCoder) -> Float[Tensor, " n_latents"]:
    """Each latent's share of what the transcoder writes on the explain split: Σ activation × ‖decoder row‖."""
    norms = coder.W_dec.detach().norm(dim=-1).double().cpu()  # the cache's statistics live on the CPU
    mass = cache.stats.count.double() * torch.nan_to_num(cache.stats.mean.double()) * norms
    return mass / mass.sum()


def choose_pool(cfg: RunConfig, cache: LatentCache, coder: SparseCoder, min_count: int) -> list[int]:
    n = cfg.pool if cfg.pool > 0 else cache.n_latents
    if cfg.pool_selection != "mass":
        return select_latents(cache, n, how=cfg.pool_selection, seed=cfg.seed, min_count=min_count)
    eligible = cache.stats.count >= min_count
    mass = torch.where(eligible, output_mass(cache, coder), torch.zeros(()))
    return torch.argsort(mass, descending=True, stable=True)[:min(n, int(eligible.sum()))].tolist()


def explain_and_score(cfg: RunConfig, backend, cache: LatentCache, pool: list[int], out: Path,
                      stages: StageTimes, runner: ShardRunner) -> tuple[list[Explanation], list[DetectionScore]]:
    sampling = cfg.sampling_config()
    with stages.timer("explain"):
        explanations = explain_latents(backend, cache, pool, cfg.explain_config(), sampling,
                                       out / "explanations.jsonl", runner=runner)
    with stages.timer("score"):
        scores = score_explanations(backend, cache, explanations, cfg.score, sampling, out / "scores.jsonl",
                                    runner=runner)
    return explanations, scores


def simulate_split(simulator: Simulator, folder: Path, texts: dict[int, str], windows: dict[int, list[str]],
                   runner: ShardRunner) -> tuple[SimulationStore, SimulationRun]:
    store = SimulationStore(folder, simulator.identity)
    run = simulate_into_store(simulator, store, texts, windows, runner=runner)
    log.info("simulations in %s: %d new, %d reused, %d NaN predictions", folder, run.windows_simulated,
             run.windows_reused, run.nan_predictions)
    return store, run


def true_activations(cache: LatentCache, window_ids: list[int], latent: int) -> Float[Tensor, " n"]:
    return torch.cat([cache.dense_window(w)[:, latent] for w in window_ids])


def fit_calibrator(kind: str, latent: int, sims: Float[Tensor, " n"], acts: Float[Tensor, " n"],
                   cache: LatentCache) -> Calibrator:
    """Fitted on the explain split only: cache statistics plus explain-split calibration windows."""
    stats = cache.stats
    cal = make_calibrator(kind, latent)
    if kind == "linear":
        return cal.fit_max(float(stats.max[latent]))  # type: ignore[attr-defined]
    if kind == "quantile":
        sample = stats.sample[latent][: int(stats.sample_size[latent])]
        return cal.fit_distribution(sims, sample, float(stats.frequency[latent]))  # type: ignore[attr-defined]
    return cal.fit(sims, acts)


def calibrate(cfg: RunConfig, cache: LatentCache, store: SimulationStore, texts: dict[int, str],
              calib_windows: dict[int, list[str]]
              ) -> tuple[dict[str, dict[int, Calibrator]], dict[str, dict[int, SimulationQuality]]]:
    calibrators: dict[str, dict[int, Calibrator]] = {k: {} for k in cfg.calibrations}
    quality: dict[str, dict[int, SimulationQuality]] = {k: {} for k in cfg.calibrations}
    for latent, text in texts.items():
        sims = store.get(latent, text, calib_windows).reshape(-1)
        acts = true_activations(cache, list(calib_windows), latent)
        for kind in cfg.calibrations:
            cal = fit_calibrator(kind, latent, sims, acts, cache)
            calibrators[kind][latent] = cal
            quality[kind][latent] = simulation_quality(latent, sims, acts, cal(sims))
    for kind, cals in calibrators.items():
        fallbacks = count_fallbacks(cals.values())
        if fallbacks:
            log.warning("%s calibration fell back to 0 for %d latent(s): %s", kind, sum(fallbacks.values()), fallbacks)
    return calibrators, quality


def fraction_choices(cfg: RunConfig, pool: list[int], scores: list[DetectionScore],
                     quality: dict[str, dict[int, SimulationQuality]]) -> dict[float, list[int]]:
    if cfg.order == "explanation_score":
        ranking = {s.latent: s.balanced_accuracy for s in scores}
    elif cfg.order == "simulation_score":
        first = quality[cfg.calibrations[0]]
        ranking = {lat: q.pearson for lat, q in first.items()}
    else:
        ranking = None
    return {f: choose_latents(f, cfg.order, ranking, cfg.seed, pool) for f in cfg.fractions}


@dataclass
class PoolArm:
    """The LLM's part: pool, explanations, scores, calibrators, simulations of the first eval windows."""

    pool: list[int]
    explanations: list[Explanation]
    scores: list[DetectionScore]
    texts: dict[int, str]
    calibrators: dict[str, dict[int, Calibrator]]
    quality: dict[str, dict[int, SimulationQuality]]
    chosen: dict[float, list[int]]
    eval_sims: dict[int, dict[int, Tensor]]
    simulator_identity: str
    nan_predictions: int


def llm_stage(ctx: Context, backend, eval_strings: dict[int, list[str]]) -> PoolArm:
    cfg, cache, stages = ctx.cfg, ctx.cache, ctx.stages
    pool = choose_pool(cfg, cache, ctx.coder, min_count=max(2, cfg.sampling.n_heldout))
    explanations, scores = explain_and_score(cfg, backend, cache, pool, ctx.out, stages, ctx.runner)
    usable, _ = usable_pool(explanations)
    texts = {r.latent: r.text for r in explanations if r.latent in set(usable)}
    simulator = Simulator.from_config(backend, cfg.simulator)
    calib_ids = sorted(random.Random(cfg.seed).sample(range(len(cache)), min(cfg.calib_windows, len(cache))))
    calib_windows = {w: cache.token_strings(cache.window_tokens(w)) for w in calib_ids}
    with stages.timer("simulate_explain"):
        calib_store, calib_run = simulate_split(simulator, ctx.out / "simulations" / "explain", texts, calib_windows,
                                                ctx.runner)
    llm_windows = {w: eval_strings[w] for w in range(cfg.llm_eval_windows)}
    with stages.timer("simulate_eval"):
        eval_store, eval_run = simulate_split(simulator, ctx.out / "simulations" / "eval", texts, llm_windows,
                                              ctx.runner)
    with stages.timer("calibrate"):
        calibrators, quality = calibrate(cfg, cache, calib_store, texts, calib_windows)
    chosen = fraction_choices(cfg, list(texts), scores, quality)
    eval_sims = {lat: eval_store.load(lat, text, llm_windows) for lat, text in texts.items()}
    return PoolArm(pool, explanations, scores, texts, calibrators, quality, chosen, eval_sims, simulator.identity,
                   calib_run.nan_predictions + eval_run.nan_predictions)


@dataclass(frozen=True)
class PoolMaterials(RunMaterials):
    """What the LLM pool's conditions are built from."""

    arm: PoolArm
    lexical: LexicalArm

    @property
    def pool(self) -> list[int]:
        return sorted(self.arm.texts)


def _pool_simulated(m: PoolMaterials, name: str, calibration: str, fraction: float) -> Replacement:
    chosen = m.arm.chosen[fraction]
    return NLSimulatorReplacement(m.coder, {lat: m.arm.eval_sims[lat] for lat in chosen},
                                  m.arm.calibrators[calibration], chosen, name=name)


def pool_planned(cfg: RunConfig, share: float) -> list[Planned[PoolMaterials]]:
    """The pool's conditions, in order; ``share`` is the pool's share of the coder's latents."""
    return [*reference_planned(cfg, coder_site(cfg)),
            Planned("pool_zeroed", "baseline", share, "pool latents set to 0",
                    lambda m, name: zeroed_condition(m.coder, m.pool, name)),
            Planned("lexical_pool", "lexical", share, f"lexical on the pool, ≤{cfg.lexical_budget} items",
                    lambda m, name: lexical_condition(m.coder, m.lexical, m.pool, name)),
            Planned("binary_oracle_pool", "oracle", share, "binary oracle on the pool",
                    lambda m, name: OracleReplacement(m.coder, "binary", m.pool, mean_active=mean_active(m.ctx.cache),
                                                      name=name)),
            *[Planned(condition_name(k, f), "llm", share * f, f"LLM simulator, {k} calibration, {100 * f:g}% of pool",
                      functools.partial(_pool_simulated, calibration=k, fraction=f))
              for k in cfg.calibrations for f in cfg.fractions]]


def pool_conditions(ctx: Context, arm: PoolArm, lexical: LexicalArm
                    ) -> tuple[Callable[[], list[Replacement]], list[Planned[PoolMaterials]]]:
    planned = pool_planned(ctx.cfg, len(arm.texts) / ctx.cache.n_latents)
    materials = PoolMaterials(ctx, arm, lexical)
    return functools.cache(lambda: [p.build(materials) for p in planned]), planned
