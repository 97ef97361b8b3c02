"""``nl-rewrite run``: the whole rewrite experiment, stage by stage, each stage resumable.

1. transcoder (cached in the user cache) → 2. latent cache on the ``explain`` split → 3. lexical explanations
of every latent, simulated, calibrated on held-out ``explain`` windows (one arm per length budget) and the
oracle ladder's noise levels → 4. the LLM pool (the latents carrying the most output mass): explanations,
detection scores, simulations, calibrators (explain split only) → 5. the Evaluator on the document-disjoint
``eval`` split: baselines, oracles, lexical arms and fraction sweeps over all latents on every eval window;
the LLM pool's conditions on the first ``llm_eval_windows`` of them (a separate run with its own references)
→ 6. results.json/csv, plots, report.html, manifest. The resolved config goes to ``config.toml`` first.

``fractions`` are fractions of the LLM *pool*; ``sweep_fractions`` are fractions of *all* latents.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite import io
from nl_rewrite.interp.calibrate import Calibrator, count_fallbacks, make_calibrator
from nl_rewrite.errors import CheckpointError
from nl_rewrite.pipeline.conditions import Planned, build_condition, planned_baseline
from nl_rewrite.data.windows import TokenWindows, token_windows
from nl_rewrite.evaluation.evaluator import EvalResults, Evaluator
from nl_rewrite.interp.explain import Explanation, explain_latents
from nl_rewrite.pipeline.ladder import (LEXICAL_CALIBRATION, LexicalArm, NoiseTargets, eval_pearson, fit_noise,
                                       lexical_arm, lexical_condition, mean_active, noisy_name, zeroed_condition)
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.evaluation.generate import side_by_side
from nl_rewrite.interp.lexical import LexicalSimulator, candidate_items
from nl_rewrite.llm.factory import check_spec, make_backend
from nl_rewrite.model.loading import check_layer_before_loading, load_model, model_name, prepend_bos_for
from nl_rewrite.paths import cache_dir
from nl_rewrite.replacements.base import Replacement
from nl_rewrite.replacements.live import LiveSimulatorReplacement
from nl_rewrite.replacements.oracles import OracleReplacement
from nl_rewrite.interp.selection import choose_latents, usable_pool
from nl_rewrite.replacements.simulated import NLSimulatorReplacement
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.pipeline.stage import Stage, cached
from nl_rewrite.pipeline.trained_arm import (TrainedMaterials, check_trained_simulator, get_simulator, trained_arm,
                                             trained_conditions, trained_windows)
from nl_rewrite.latents.sampling import select_latents
from nl_rewrite.interp.score import DetectionScore, score_explanations
from nl_rewrite.interp.simulate import Simulator
from nl_rewrite.interp.simulation_store import (SimulationQuality, SimulationRun, SimulationStore, simulate_into_store,
                                               simulation_quality)
from nl_rewrite.parallel.runner import InProcess, ShardRunner
from nl_rewrite.coders.checkpoint import is_checkpoint, load_coder
from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.hashing import digest

log = logging.getLogger(__name__)
CONFIG_FILE = "config.toml"
"""The resolved config of a run, in its output folder."""
RESULTS_FILE = "results.json"
"""A run's summary: written last, and removed when a rerun starts, so a folder holding it is a finished run."""
HEADLINE_LEXICAL = "lexical"


def condition_name(calibration: str, fraction: float) -> str:
    return f"sim_{calibration}_f{fraction:g}"


@dataclass(frozen=True)
class ConditionInfo:
    """What a condition is, for tables, plots and the answer: its family and how much it simulates."""

    family: str
    """baseline, oracle, lexical, llm or trained."""
    fraction_of_latents: float
    pearson: float
    """Mean per-latent Pearson r of the written values with the true activations on the evaluated windows."""
    label: str = ""


@dataclass
class Artifacts:
    """Everything the report needs, produced by :func:`run_experiment`."""

    cfg: RunConfig
    results: dict[str, EvalResults]
    """position mode → every condition on all eval windows."""
    pool_results: EvalResults
    """The LLM pool's conditions (and references) on the first ``llm_eval_windows`` eval windows."""
    info: dict[str, ConditionInfo]
    lexical: dict[int, LexicalArm]
    pool_mass_share: float
    explanations: list[Explanation]
    scores: list[DetectionScore]
    quality: dict[str, dict[int, SimulationQuality]]
    pool: list[int]
    n_latents: int
    chosen: dict[float, list[int]]
    fallbacks: dict[str, dict[str, int]]
    counts: dict[str, int]
    stages: dict[str, float]
    decode: Callable[[list[int]], list[str]]
    """token ids → token strings, for showing examples."""
    generations: list[dict] = field(default_factory=list)
    """Greedy continuations of eval prompts from the clean and rewritten models."""
    trained_results: EvalResults | None = None
    """The trained simulator at 100% of latents and its references on the first ``trained_eval_windows`` eval
    windows (None unless ``--trained-simulator`` is set)."""


# ---- stages 1-3: coder, latent cache, pool ------------------------------------------------------------------

def coder_site(cfg: RunConfig) -> str:
    """The site the run's coder writes: the MLP's output (transcoder) or the SAE's site (as its trainer places it)."""
    from nl_rewrite.coders.train import coder_sites

    return coder_sites(cfg.coder, cfg.layer, cfg.sae_site)[1]


def load_run_coder(cfg: RunConfig, model) -> SparseCoder:
    """The run's transcoder or SAE: the cached default, a quickly trained small one, or a checkpoint."""
    from nl_rewrite.coders.train import TrainConfig, coder_folder, default_coder, train

    if cfg.transcoder == "default":
        return default_coder(model_name(model), cfg.layer, model=model, kind=cfg.coder, sae_site=cfg.sae_site)
    if cfg.transcoder == "small":
        tcfg = TrainConfig(model=model_name(model), layer=cfg.layer, kind=cfg.coder, sae_site=cfg.sae_site,
                           width=cfg.width, tokens=cfg.train_tokens, seed=cfg.seed)
        folder = f"{coder_folder(tcfg.model, tcfg.sites[0], tcfg.kind, tcfg.width, tcfg.k)}-t{cfg.train_tokens}"
        return train(dataclasses.replace(tcfg, out=folder), model=model)
    coder = load_coder(cfg.transcoder, model=model)
    if coder.cfg.kind != cfg.coder or coder.cfg.write_site != coder_site(cfg):
        raise CheckpointError(f"{cfg.transcoder} is a {coder.cfg.kind} writing {coder.cfg.write_site}, but the run asks "
                              f"for a {cfg.coder} writing {coder_site(cfg)}; pass --coder and --layer (and --sae-site) "
                              "to match the checkpoint")
    return coder


def explain_cache(cfg: RunConfig) -> tuple[LatentCache, list[str]]:
    """The run's explain-split latent cache (``<out>/latents``, built if needed) and its windows' document ids."""
    model = load_model(cfg.model)
    windows = windows_for(cfg, model, "explain", cfg.explain_windows)
    cache = LatentCache.build(model, load_run_coder(cfg, model), windows, Path(cfg.out) / "latents")
    return cache, windows.doc_ids


def windows_for(cfg: RunConfig, model, split: str, n: int) -> TokenWindows:
    return token_windows(model, split, window=cfg.window, max_windows=n, seed=cfg.seed,
                         prepend_bos=prepend_bos_for(cfg.model))


def output_mass(cache: LatentCache, coder: SparseCoder) -> Float[Tensor, " n_latents"]:
    """Each latent's share of what the transcoder writes on the explain split: Σ activation × ‖decoder row‖."""
    mass = cache.stats.count.double() * torch.nan_to_num(cache.stats.mean.double()) * coder.W_dec.detach().norm(dim=-1).double()
    return mass / mass.sum()


def choose_pool(cfg: RunConfig, cache: LatentCache, coder: SparseCoder, min_count: int) -> list[int]:
    n = cfg.pool if cfg.pool > 0 else cache.n_latents
    if cfg.pool_selection != "mass":
        return select_latents(cache, n, how=cfg.pool_selection, seed=cfg.seed, min_count=min_count)
    eligible = cache.stats.count >= min_count
    mass = torch.where(eligible, output_mass(cache, coder), torch.zeros(()))
    return torch.argsort(mass, descending=True, stable=True)[:min(n, int(eligible.sum()))].tolist()


# ---- stages 4-5: explanations and scores --------------------------------------------------------------------

def explain_and_score(cfg: RunConfig, backend, cache: LatentCache, pool: list[int], out: Path,
                      stages: Stage, runner: ShardRunner) -> tuple[list[Explanation], list[DetectionScore]]:
    sampling = cfg.sampling_config()
    explanations = stages.timed("explain", explain_latents, backend, cache, pool, cfg.explain_config(), sampling,
                                out / "explanations.jsonl", runner=runner)
    scores = stages.timed("score", score_explanations, backend, cache, explanations, cfg.score, sampling,
                          out / "scores.jsonl", runner=runner)
    return explanations, scores


# ---- stage 6: simulations ----------------------------------------------------------------------------------

def window_strings(cache: LatentCache, windows: TokenWindows) -> dict[int, list[str]]:
    return {i: cache.token_strings(row.tolist()) for i, row in enumerate(windows.tokens)}


def simulate_split(simulator: Simulator, folder: Path, texts: dict[int, str], windows: dict[int, list[str]],
                   runner: ShardRunner) -> tuple[SimulationStore, SimulationRun]:
    store = SimulationStore(folder, simulator.identity)
    run = simulate_into_store(simulator, store, texts, windows, runner=runner)
    log.info("simulations in %s: %d new, %d reused, %d NaN predictions", folder, run.windows_simulated,
             run.windows_reused, run.nan_predictions)
    return store, run


# ---- stage 7: calibration -------------------------------------------------------------------------------------

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


# ---- stage 8: evaluation ------------------------------------------------------------------------------------

def evaluate_cached(model, windows: TokenWindows, build: Callable[[], list[Replacement]], path: Path, mode: str,
                    cfg: RunConfig, fingerprint: str, stages: Stage, runner: ShardRunner) -> EvalResults:
    """One Evaluator run, reused from ``path`` when its fingerprint matches (conditions are then never built)."""
    def evaluate() -> EvalResults:
        conditions = stages.timed(f"conditions_{path.stem}", build)  # fits mean ablation and noise, tabulates sims
        return stages.timed(f"evaluate_{path.stem}", Evaluator(model, windows, cfg.batch_size, mode, seed=cfg.seed).run,
                            conditions, runner)

    return cached(path, fingerprint, EvalResults, evaluate)


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


def result_options(cfg: RunConfig) -> dict:
    """The options cached results are keyed by: all but the output folder (a moved or copied run stays cached)."""
    return {k: v for k, v in cfg.to_dict().items() if k != "out"}


def trained_calibration_windows(cfg: RunConfig, simulator, cache: LatentCache) -> list[int]:
    """Explain windows the trained simulator never trained on: its held-out documents' windows when it was trained on
    this cache, else the lexical calibration windows (another cache's training windows are not these)."""
    fingerprint, heldout = simulator.heldout
    if fingerprint != cache.meta.windows_fingerprint or not heldout:
        return heldout_windows(cfg, len(cache))[:cfg.trained_calib_windows]
    return sorted(random.Random(cfg.seed).sample(list(heldout), min(cfg.trained_calib_windows, len(heldout))))


def code_version() -> str:
    """The installed nl_rewrite version: part of every cached result's key, so a new release never reuses them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nl_rewrite")
    except PackageNotFoundError:
        return "unknown"


def arm_digest(arm: LexicalArm) -> str:
    """Hash of an arm's explanations and fitted calibrators: cached evaluations depend on both."""
    payload = json.dumps([sorted(arm.texts.items()), [arm.calibrators[k].to_dict() for k in sorted(arm.calibrators)]],
                         default=str)
    return digest(payload)


# ---- the driver -----------------------------------------------------------------------------------------------

@dataclass
class Context:
    """What every stage reads: the config, the model, the transcoder, the explain-split cache, the output folder."""

    cfg: RunConfig
    model: object
    transcoder: SparseCoder
    cache: LatentCache
    out: Path
    stages: Stage
    runner: ShardRunner
    """Where the sharded stages run (this process, or Ray workers)."""


def lexical_stage(ctx: Context, eval_strings: dict[int, list[str]]) -> dict[int, LexicalArm]:
    """One lexical arm per budget; statistics from explain windows not held out for calibration."""
    cfg, cache = ctx.cfg, ctx.cache
    calib_ids = heldout_windows(cfg, len(cache))
    stat_ids = sorted(set(range(len(cache))) - set(calib_ids))
    budgets = sorted({cfg.lexical_budget, *cfg.lexical_budgets})
    candidates = candidate_items(cache, stat_ids, max_per_latent=max(budgets))
    return {b: lexical_arm(cache, stat_ids, calib_ids, candidates, b, eval_strings, ctx.out) for b in budgets}


def lexical_budget_arm(ctx: Context, budget: int, calib_ids: list[int]) -> LexicalArm:
    """One lexical arm, for live use on new text (no eval windows are simulated)."""
    stat_ids = sorted(set(range(len(ctx.cache))) - set(calib_ids))
    candidates = candidate_items(ctx.cache, stat_ids, max_per_latent=budget)
    return lexical_arm(ctx.cache, stat_ids, calib_ids, candidates, budget, {}, ctx.out)


def heldout_windows(cfg: RunConfig, n: int) -> list[int]:
    return sorted(random.Random(cfg.seed + 1).sample(range(n), min(cfg.lexical_calib_windows, n - 1)))


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
    pool = choose_pool(cfg, cache, ctx.transcoder, min_count=max(2, cfg.sampling.n_heldout))
    explanations, scores = explain_and_score(cfg, backend, cache, pool, ctx.out, stages, ctx.runner)
    usable, _ = usable_pool(explanations)
    texts = {r.latent: r.text for r in explanations if r.latent in set(usable)}
    simulator = Simulator.from_config(backend, cfg.simulator)
    calib_ids = sorted(random.Random(cfg.seed).sample(range(len(cache)), min(cfg.calib_windows, len(cache))))
    calib_windows = {w: cache.token_strings(cache.window_tokens(w)) for w in calib_ids}
    calib_store, calib_run = stages.timed("simulate_explain", simulate_split, simulator,
                                          ctx.out / "simulations" / "explain", texts, calib_windows, ctx.runner)
    llm_windows = {w: eval_strings[w] for w in range(cfg.llm_eval_windows)}
    eval_store, eval_run = stages.timed("simulate_eval", simulate_split, simulator,
                                        ctx.out / "simulations" / "eval", texts, llm_windows, ctx.runner)
    calibrators, quality = stages.timed("calibrate", calibrate, cfg, cache, calib_store, texts, calib_windows)
    chosen = fraction_choices(cfg, list(texts), scores, quality)
    eval_sims = {lat: eval_store.load(lat, text, llm_windows) for lat, text in texts.items()}
    return PoolArm(pool, explanations, scores, texts, calibrators, quality, chosen, eval_sims, simulator.identity,
                   calib_run.nan_predictions + eval_run.nan_predictions)


@dataclass(frozen=True)
class RunMaterials:
    """The run a block of conditions belongs to: its subject model and coder (what every baseline is built from)."""

    ctx: Context

    @property
    def model(self):
        return self.ctx.model

    @property
    def coder(self) -> SparseCoder:
        return self.ctx.transcoder


@dataclass(frozen=True)
class MainMaterials(RunMaterials):
    """What the all-latent conditions are built from, made once when they are evaluated."""

    arms: dict[int, LexicalArm]
    headline: LexicalArm
    noise: NoiseTargets
    ranking: list[int]
    """Every latent, the best-explained first (by the headline arm's explain-split r)."""

    def top(self, fraction: float) -> list[int]:
        return self.ranking[:max(1, round(fraction * len(self.ranking)))]


def _true_oracle(m: MainMaterials, name: str) -> Replacement:
    return OracleReplacement(m.coder, "true", None, name=name)


def _binary_oracle(m: MainMaterials, name: str, fraction: float = 1.0) -> Replacement:
    return OracleReplacement(m.coder, "binary", None if fraction == 1.0 else m.top(fraction),
                             mean_active=mean_active(m.ctx.cache), name=name)


def _noisy_oracle(m: MainMaterials, name: str, target: float) -> Replacement:
    return OracleReplacement(m.coder, "noisy", None, noise_sd=m.noise.multipliers[target] * m.noise.sd,
                             seed=m.ctx.cfg.seed, name=name)


def _lexical(m: MainMaterials, name: str, budget: int, fraction: float = 1.0) -> Replacement:
    latents = range(len(m.ranking)) if fraction == 1.0 else m.top(fraction)
    return lexical_condition(m.coder, m.arms[budget], latents, name)


def main_planned(cfg: RunConfig) -> list[Planned[MainMaterials]]:
    """Every condition evaluated on all eval windows, in order: the coder and the baselines, the oracle ladder, one
    lexical arm per budget, and per sweep fraction the best-explained latents lexically and as binary oracle."""
    site = coder_site(cfg)
    planned: list[Planned[MainMaterials]] = [
        *reference_planned(cfg, site), planned_baseline("zero", cfg.layer, cfg.seed, site, 0.0, f"{site} zero-ablated"),
        planned_baseline("mean", cfg.layer, cfg.seed, site, 0.0, f"{site} mean-ablated"),
        planned_baseline("random_latents", cfg.layer, cfg.seed, site, 1.0, "random active latents"),
        Planned("oracle", "oracle", 1.0, "true activations", _true_oracle),
        Planned("binary_oracle", "oracle", 1.0, "binary oracle", _binary_oracle),
        *[Planned(noisy_name(r), "oracle", 1.0, f"noisy oracle, target r={r:g}",
                  functools.partial(_noisy_oracle, target=r)) for r in cfg.noise_targets],
        Planned(HEADLINE_LEXICAL, "lexical", 1.0, f"lexical, ≤{cfg.lexical_budget} items",
                functools.partial(_lexical, budget=cfg.lexical_budget)),
        *[Planned(f"lexical_b{b}", "lexical", 1.0, f"lexical, ≤{b} items", functools.partial(_lexical, budget=b))
          for b in sorted(set(cfg.lexical_budgets) - {cfg.lexical_budget})]]
    for f in cfg.sweep_fractions:
        planned += [Planned(f"lexical_f{f:g}", "lexical", f, f"lexical, {100 * f:g}% of latents",
                            functools.partial(_lexical, budget=cfg.lexical_budget, fraction=f)),
                    Planned(f"binary_oracle_f{f:g}", "oracle", f, f"binary oracle, {100 * f:g}% of latents",
                            functools.partial(_binary_oracle, fraction=f))]
    return planned


def reference_planned(cfg: RunConfig, site: str) -> list[Planned]:
    """The two conditions every recovery fraction is measured between: the coder itself and zero-latents."""
    return [planned_baseline(cfg.coder, cfg.layer, cfg.seed, site, 1.0, cfg.coder),
            planned_baseline("zero_latents", cfg.layer, cfg.seed, site, 0.0, "no active latents")]


def main_conditions(ctx: Context, arms: dict[int, LexicalArm]
                    ) -> tuple[Callable[[], list[Replacement]], list[Planned[MainMaterials]]]:
    """Builder of every all-latent condition (built at most once: evaluation and measuring share them)."""
    cfg, cache = ctx.cfg, ctx.cache
    headline = arms[cfg.lexical_budget]
    ranking = sorted(headline.texts, key=lambda lat: -_finite_or(headline.ranking().get(lat), -2.0))
    ranking += sorted(set(range(cache.n_latents)) - set(ranking))  # latents never fired (no explanation) go last
    planned = main_planned(cfg)

    def build() -> list[Replacement]:
        noise = fit_noise(cache, heldout_windows(cfg, len(cache)), cfg.noise_targets, cfg.seed)
        materials = MainMaterials(ctx, arms, headline, noise, ranking)
        return [p.build(materials) for p in planned]

    return functools.cache(build), planned


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


def _finite_or(value: float | None, default: float) -> float:
    return value if value is not None and value == value else default


def measured_info(planned: list[Planned], conditions: Callable[[], list[Replacement]], eval_cache: LatentCache,
                  window_ids: list[int], path: Path, fingerprint: str) -> dict[str, ConditionInfo]:
    """Each planned condition's info with its Pearson r measured on the evaluated windows (cached by fingerprint)."""
    def measure() -> dict[str, ConditionInfo]:
        return {p.name: ConditionInfo(p.family, float(p.fraction), eval_pearson(rep, eval_cache, window_ids)
                                      if p.family != "baseline" else float("nan"), p.label)
                for p, rep in zip(planned, conditions(), strict=True)}

    return cached(path, fingerprint, dict[str, ConditionInfo], measure)


GENERATION_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 3, 16, 12


def rewritten_models(ctx: Context, arm: LexicalArm) -> dict[str, Replacement | None]:
    """Clean, the coder, the lexically rewritten layer (live: simulates any text) and zero-latents."""
    tc = ctx.transcoder
    return {"clean": None, ctx.cfg.coder: build_condition(ctx.cfg.coder, ctx.model, ctx.cfg.layer, lambda: tc),
            f"lexical rewrite (≤{arm.budget} items)": LiveSimulatorReplacement(
                tc, LexicalSimulator(), arm.texts, arm.calibrators, ctx.cache.token_strings, name="lexical_live"),
            "zero_latents": build_condition("zero_latents", ctx.model, ctx.cfg.layer, lambda: tc)}


def generation_stage(ctx: Context, arm: LexicalArm, eval_windows: TokenWindows, fingerprint: str) -> list[dict]:
    """Greedy continuations of the first eval windows' openings, per rewritten model (cached by fingerprint)."""
    def generate() -> list[dict]:
        prompts = [eval_windows.tokens[i, :PROMPT_TOKENS] for i in range(min(GENERATION_PROMPTS, len(eval_windows)))]
        return side_by_side(ctx.model, prompts, rewritten_models(ctx, arm), NEW_TOKENS, ctx.cache.token_strings)

    return cached(ctx.out / "generations.json", fingerprint, list[dict], generate)


def check_before_loading(cfg: RunConfig) -> None:
    """Every check that needs no model output, so a wrong option fails in seconds, not after the first stages."""
    check_layer_before_loading(cfg.model, cfg.layer)  # the model's name too
    check_spec(cfg.llm)
    check_trained_simulator(cfg.trained_simulator)
    if cfg.transcoder not in ("default", "small") and not is_checkpoint(cfg.transcoder):
        raise CheckpointError(f"--transcoder {cfg.transcoder!r} is neither default, small nor a checkpoint folder "
                              "(cfg.json and weights); train one with `nl-rewrite train --out FOLDER`")


def run_experiment(cfg: RunConfig, runner: ShardRunner | None = None) -> Artifacts:
    """Run (or resume) the experiment ``cfg`` describes; writes into ``cfg.out`` and returns the artifacts.

    The resolved config (every preset value filled in) is written to ``<out>/config.toml`` first: ``nl-rewrite run
    --config <out>/config.toml`` repeats the run. ``runner`` (default: this process; ``--ray``: Ray workers) runs
    the latent caches, explanation, scoring, simulation and evaluation in shards; the results are the same."""
    cfg = cfg.resolved()
    check_before_loading(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).unlink(missing_ok=True)  # until this run finishes, the folder must not look finished
    io.write_text(out / CONFIG_FILE, cfg.to_toml())
    stages = Stage()
    runner = runner or InProcess()
    torch.manual_seed(cfg.seed)
    model = stages.timed("load_model", load_model, cfg.model)
    transcoder = stages.timed(cfg.coder, load_run_coder, cfg, model)
    explain_windows = windows_for(cfg, model, "explain", cfg.explain_windows)
    cache = stages.timed("latent_cache", LatentCache.build, model, transcoder, explain_windows, out / "latents",
                         runner=runner)
    ctx = Context(cfg, model, transcoder, cache, out, stages, runner)
    eval_windows = windows_for(cfg, model, "eval", cfg.eval_windows)
    eval_cache = stages.timed("latent_cache_eval", LatentCache.build, model, transcoder, eval_windows,
                              out / "latents_eval", progress=False, runner=runner)
    eval_strings = window_strings(cache, eval_windows)
    arms = stages.timed("lexical", lexical_stage, ctx, eval_strings)
    backend = make_backend(cfg.llm, cache=cache_dir() / "llm_calls.sqlite")
    pool = llm_stage(ctx, backend, eval_strings)

    # the trained simulator's options key only its own block (adding it to a finished run evaluates nothing else)
    run_options = {k: v for k, v in result_options(cfg).items() if not k.startswith("trained")}
    base_fp = [run_options, eval_windows.fingerprint(), cache.meta.coder_fingerprint, code_version()]
    build, plan = main_conditions(ctx, arms)
    main_fp = json.dumps(base_fp + [LexicalSimulator().identity, LEXICAL_CALIBRATION,
                                    {b: arm_digest(a) for b, a in arms.items()}], default=str)
    results = {mode: evaluate_cached(model, eval_windows, build, out / f"eval_{mode}.json", mode, cfg, main_fp, stages,
                                 runner)
               for mode in cfg.position_modes}
    ids = list(range(len(eval_windows)))
    info = stages.timed("measure_pearson", measured_info, plan, build, eval_cache, ids, out / "conditions.json", main_fp)

    llm_windows = eval_windows.subset(list(range(cfg.llm_eval_windows)))
    build_pool, pool_plan = pool_conditions(ctx, pool, arms[cfg.lexical_budget])
    pool_fp = json.dumps(base_fp + [pool.simulator_identity, sorted(pool.texts.items()), main_fp], default=str)
    pool_results = evaluate_cached(model, llm_windows, build_pool, out / "eval_pool.json", "all", cfg, pool_fp, stages,
                                   runner)
    pool_info = measured_info(pool_plan, build_pool, eval_cache, list(range(cfg.llm_eval_windows)),
                              out / "conditions_pool.json", pool_fp)

    trained_results, trained_info = trained_stage(ctx, arms[cfg.lexical_budget], explain_windows, eval_windows,
                                                  eval_cache, eval_strings, [result_options(cfg), main_fp])
    generations = stages.timed("generate", generation_stage, ctx, arms[cfg.lexical_budget], eval_windows, main_fp)
    mass = output_mass(cache, transcoder)
    # under Ray the calls are made by the workers' own copies of the backend, which this process cannot count
    backend_counts = {k: getattr(backend, k) for k in ("new_calls", "hits")
                      if hasattr(backend, k) and not runner.parallel}
    counts = {"pool": len(pool.pool), "explained_ok": len(pool.texts),
              "explanations_failed": len(pool.explanations) - len(pool.texts),
              "simulated_nan_predictions": pool.nan_predictions,
              "lexical_explained": len(arms[cfg.lexical_budget].texts),
              "lexical_parse_fallbacks": sum(a.fallbacks for a in arms.values()), **backend_counts}
    info = {**info, **{f"pool:{k}": v for k, v in pool_info.items()}, **{f"trained:{k}": v for k, v in trained_info.items()}}
    return Artifacts(cfg, results, pool_results, info, arms,
                     float(mass[sorted(pool.texts)].sum()) if pool.texts else 0.0,
                     pool.explanations, pool.scores, pool.quality, sorted(pool.texts), cache.n_latents, pool.chosen,
                     {k: count_fallbacks(v.values()) for k, v in pool.calibrators.items()}, counts, stages.seconds,
                     cache.token_strings, generations, trained_results)


def trained_stage(ctx: Context, headline: LexicalArm, explain_windows: TokenWindows, eval_windows: TokenWindows,
                  eval_cache: LatentCache, eval_strings: dict[int, list[str]], base_fp: list
                  ) -> tuple[EvalResults | None, dict[str, ConditionInfo]]:
    """The trained simulator's block (see :mod:`.trained_arm`); nothing unless ``--trained-simulator`` is set."""
    cfg, stages = ctx.cfg, ctx.stages
    if cfg.trained_simulator == "none":
        return None, {}
    simulator = stages.timed("train_simulator", get_simulator, cfg, ctx.cache, explain_windows.doc_ids)
    calib_ids = trained_calibration_windows(cfg, simulator, ctx.cache)
    windows = trained_windows(cfg, eval_windows)
    arm = stages.timed("simulate_trained", trained_arm, simulator, headline, ctx.cache, calib_ids,
                       {w: eval_strings[w] for w in range(len(windows))}, ctx.out / "simulations" / "trained")
    build, plan = trained_conditions(cfg, TrainedMaterials(ctx.model, ctx.transcoder, ctx.cache, arm, headline),
                                     coder_site(cfg))
    fingerprint = json.dumps(base_fp + [simulator.identity, calib_ids, len(windows)], default=str)
    results = evaluate_cached(ctx.model, windows, build, ctx.out / "eval_trained.json", "all", cfg, fingerprint, stages,
                              ctx.runner)
    info = measured_info(plan, build, eval_cache, list(range(len(windows))), ctx.out / "conditions_trained.json",
                         fingerprint)
    return results, info
