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

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nl_rewrite import io
from nl_rewrite.interp.calibrate import count_fallbacks
from nl_rewrite.errors import CheckpointError
from nl_rewrite.pipeline.conditions import UNMEASURED, ConditionInfo, Planned, build_condition
from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.evaluation.evaluator import EvalResults, Evaluator
from nl_rewrite.interp.explain import Explanation
from nl_rewrite.pipeline.ladder import LEXICAL_CALIBRATION, LexicalArm, eval_pearson
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.evaluation.generate import Generation, side_by_side
from nl_rewrite.interp.lexical import LexicalSimulator
from nl_rewrite.llm.factory import check_spec, make_backend
from nl_rewrite.model.hub import HF_SPEC
from nl_rewrite.model.loading import check_layer_before_loading, load_model
from nl_rewrite.paths import cache_dir
from nl_rewrite.replacements.base import Replacement
from nl_rewrite.replacements.live import LiveSimulatorReplacement
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.pipeline.results import RESULTS_FILE, Diagnostics
from nl_rewrite.pipeline.stage import StageTimes, cached
from nl_rewrite.pipeline.trained_arm import (TrainedMaterials, check_trained_simulator, get_simulator, trained_arm,
                                             trained_conditions, trained_windows)
from nl_rewrite.interp.score import DetectionScore
from nl_rewrite.interp.simulation_store import SimulationQuality
from nl_rewrite.parallel.runner import InProcess, ShardRunner
from nl_rewrite.coders.checkpoint import is_checkpoint
from nl_rewrite.pipeline.run_context import (Context, coder_site, load_run_coder, windows_for, heldout_windows,
                                             window_strings, result_options, code_version)
from nl_rewrite.pipeline.pool_arm import PoolArm, llm_stage, output_mass, pool_conditions
from nl_rewrite.pipeline.main_arm import arm_digest, diagnose, lexical_stage, main_conditions, main_planned


CONFIG_FILE = "config.toml"
"""The resolved config of a run, in its output folder."""


@dataclass
class Artifacts:
    """Everything the report needs, produced by :func:`run_experiment`."""

    cfg: RunConfig
    results: dict[str, EvalResults]
    """position mode → every condition on all eval windows."""
    pool_results: EvalResults
    """The LLM pool's conditions (and references) on the first ``llm_eval_windows`` eval windows."""
    info: dict[str, ConditionInfo]
    """What each main condition is (family, fraction, measured Pearson r), by name."""
    pool_info: dict[str, ConditionInfo]
    """The same for the pool's conditions (their names may repeat a main condition's: they are other windows)."""
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
    generations: list[Generation] = field(default_factory=list)
    """Greedy continuations of eval prompts from the clean and rewritten models."""
    trained_results: EvalResults | None = None
    """The trained simulator at 100% of latents and its references on the first ``trained_eval_windows`` eval
    windows (None unless ``--trained-simulator`` is set)."""
    trained_info: dict[str, ConditionInfo] = field(default_factory=dict)
    """What each condition of the trained block is (empty without it)."""
    diagnostics: Diagnostics | None = None
    """Where the headline lexical arm loses the gap (its swaps are main conditions)."""


def evaluate_cached(model, windows: TokenWindows, build: Callable[[], list[Replacement]], path: Path, mode: str,
                    cfg: RunConfig, fingerprint: str, stages: StageTimes, runner: ShardRunner) -> EvalResults:
    """One Evaluator run, reused from ``path`` when its fingerprint matches (conditions are then never built)."""
    def evaluate() -> EvalResults:
        with stages.timer(f"conditions_{path.stem}"):
            conditions = build()  # fits mean ablation and noise, tabulates simulations
        with stages.timer(f"evaluate_{path.stem}"):
            return Evaluator(model, windows, cfg.batch_size, mode, seed=cfg.seed).run(conditions, runner)

    return cached(path, fingerprint, EvalResults, evaluate)


def trained_calibration_windows(cfg: RunConfig, simulator, cache: LatentCache) -> list[int]:
    """Explain windows the trained simulator never trained on: its held-out documents' windows when it was trained on
    this cache, else the lexical calibration windows (another cache's training windows are not these)."""
    fingerprint, heldout = simulator.heldout
    if fingerprint != cache.meta.windows_fingerprint or not heldout:
        return heldout_windows(cfg, len(cache))[:cfg.trained_calib_windows]
    return sorted(random.Random(cfg.seed).sample(list(heldout), min(cfg.trained_calib_windows, len(heldout))))


def measured_info(planned: list[Planned], conditions: Callable[[], list[Replacement]], eval_cache: LatentCache,
                  window_ids: list[int], path: Path, fingerprint: str) -> dict[str, ConditionInfo]:
    """Each planned condition's info with its Pearson r measured on the evaluated windows (cached by fingerprint)."""
    def measure() -> dict[str, ConditionInfo]:
        return {p.name: ConditionInfo(p.family, float(p.fraction), eval_pearson(rep, eval_cache, window_ids)
                                      if p.family not in UNMEASURED else float("nan"), p.label)
                for p, rep in zip(planned, conditions(), strict=True)}

    return cached(path, fingerprint, dict[str, ConditionInfo], measure)


GENERATION_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 3, 16, 12


def rewritten_models(ctx: Context, arm: LexicalArm) -> dict[str, Replacement | None]:
    """Clean, the coder, the lexically rewritten layer (live: simulates any text) and zero-latents."""
    tc = ctx.coder
    return {"clean": None, ctx.cfg.coder: build_condition(ctx.cfg.coder, ctx.model, ctx.cfg.layer, lambda: tc),
            f"lexical rewrite (≤{arm.budget} items)": LiveSimulatorReplacement(
                tc, LexicalSimulator(), arm.texts, arm.calibrators, ctx.cache.token_strings, name="lexical_live"),
            "zero_latents": build_condition("zero_latents", ctx.model, ctx.cfg.layer, lambda: tc)}


def generation_stage(ctx: Context, arm: LexicalArm, eval_windows: TokenWindows, fingerprint: str
                     ) -> list[Generation]:
    """Greedy continuations of the first eval windows' openings, per rewritten model (cached by fingerprint)."""
    def generate() -> list[Generation]:
        prompts = [eval_windows.tokens[i, :PROMPT_TOKENS] for i in range(min(GENERATION_PROMPTS, len(eval_windows)))]
        return side_by_side(ctx.model, prompts, rewritten_models(ctx, arm), NEW_TOKENS, ctx.cache.token_strings)

    return cached(ctx.out / "generations.json", fingerprint, list[Generation], generate)


def check_before_loading(cfg: RunConfig) -> None:
    """Every check that needs no model output, so a wrong option fails in seconds, not after the first stages."""
    check_layer_before_loading(cfg.model, cfg.layer)  # the model's name too
    check_spec(cfg.llm)
    check_trained_simulator(cfg.trained_simulator)
    local = cfg.coder_checkpoint not in ("default", "small") and not cfg.coder_checkpoint.startswith(HF_SPEC)
    if local and not is_checkpoint(cfg.coder_checkpoint):
        raise CheckpointError(f"--coder-checkpoint {cfg.coder_checkpoint!r} is neither default, small, "
                              "hf:ORG/REPO[/SUBFOLDER] nor a checkpoint folder (cfg.json and weights); train one with "
                              "`nl-rewrite train --out FOLDER`")


def run_experiment(cfg: RunConfig, runner: ShardRunner | None = None) -> Artifacts:
    """Run (or resume) the experiment ``cfg`` describes; writes into ``cfg.out`` and returns the artifacts.

    The resolved config (every preset value filled in) is written to ``<out>/config.toml`` first: ``nl-rewrite run
    --config <out>/config.toml`` repeats the run. ``runner`` (default: this process; ``--ray``: Ray workers) runs
    the latent caches, explanation, scoring, simulation and evaluation in shards; the results are the same."""
    cfg = cfg.resolved()
    check_before_loading(cfg)
    ctx, explain_windows = open_run(cfg, runner or InProcess())
    eval_windows = windows_for(cfg, ctx.model, "eval", cfg.eval_windows)
    with ctx.stages.timer("latent_cache_eval"):
        eval_cache = LatentCache.build(ctx.model, ctx.coder, eval_windows, ctx.out / "latents_eval", progress=False,
                                       runner=ctx.runner)
    eval_strings = window_strings(ctx.cache, eval_windows)
    with ctx.stages.timer("lexical"):
        arms = lexical_stage(ctx, eval_strings)
    backend = make_backend(cfg.llm, cache=cache_dir() / "llm_calls.sqlite", placement=cfg.placement)
    pool = llm_stage(ctx, backend, eval_strings)
    calls = llm_call_counts(ctx, backend)
    del backend  # no stage after the LLM's needs it: the evaluations' peak memory goes without its weights
    headline = arms[cfg.lexical_budget]

    base_fp, main_fp = run_fingerprints(ctx, eval_windows, arms)
    results, info = main_block(ctx, arms, eval_windows, eval_cache, main_fp)
    with ctx.stages.timer("diagnose"):
        diagnostics = diagnose(ctx, headline, eval_cache, main_fp)
    pool_results, pool_info = pool_block(ctx, pool, headline, eval_windows, eval_cache, base_fp, main_fp)
    trained_results, trained_info = trained_stage(ctx, headline, explain_windows.doc_ids, eval_windows, eval_cache,
                                                  eval_strings, [result_options(cfg), main_fp])
    with ctx.stages.timer("generate"):
        generations = generation_stage(ctx, headline, eval_windows, main_fp)
    mass = output_mass(ctx.cache, ctx.coder)
    return Artifacts(
        cfg=cfg, results=results, pool_results=pool_results, lexical=arms, info=info, pool_info=pool_info,
        pool_mass_share=float(mass[sorted(pool.texts)].sum()) if pool.texts else 0.0,
        explanations=pool.explanations, scores=pool.scores, quality=pool.quality, pool=sorted(pool.texts),
        n_latents=ctx.cache.n_latents, chosen=pool.chosen,
        fallbacks={k: count_fallbacks(v.values()) for k, v in pool.calibrators.items()},
        counts=run_counts(ctx, arms, pool, calls), stages=ctx.stages.seconds, decode=ctx.cache.token_strings,
        generations=generations, trained_results=trained_results, trained_info=trained_info, diagnostics=diagnostics)


def run_fingerprints(ctx: Context, eval_windows: TokenWindows, arms: dict[int, LexicalArm]) -> tuple[list, str]:
    """What every evaluated block is keyed by (the options, the eval windows, the coder, the version), and the main
    block's key (that, plus the lexical simulator and explanations)."""
    # the trained simulator's options key only its own block (adding it to a finished run evaluates nothing else)
    run_options = {k: v for k, v in result_options(ctx.cfg).items() if not k.startswith("trained")}
    base_fp = [run_options, eval_windows.fingerprint(), ctx.cache.meta.coder_fingerprint, code_version()]
    # the conditions' names too: a run made before a condition was added to the block is evaluated again
    main_fp = json.dumps(base_fp + [LexicalSimulator().identity, LEXICAL_CALIBRATION,
                                    {b: arm_digest(a) for b, a in arms.items()},
                                    [p.name for p in main_planned(ctx.cfg)]], default=str)
    return base_fp, main_fp


def open_run(cfg: RunConfig, runner: ShardRunner) -> tuple[Context, TokenWindows]:
    """Prepare the output folder (config first; a finished run's marker removed), then load the model and the coder
    and build the latent cache of the explain windows (returned too)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).unlink(missing_ok=True)  # until this run finishes, the folder must not look finished
    io.write_text(out / CONFIG_FILE, cfg.to_toml())
    stages = StageTimes()
    torch.manual_seed(cfg.seed)
    with stages.timer("load_model"):
        model = load_model(cfg.model, cfg.placement)
    with stages.timer(cfg.coder):
        coder = load_run_coder(cfg, model)
    explain_windows = windows_for(cfg, model, "explain", cfg.explain_windows)
    with stages.timer("latent_cache"):
        cache = LatentCache.build(model, coder, explain_windows, out / "latents", runner=runner)
    return Context(cfg, model, coder, cache, out, stages, runner), explain_windows


def main_block(ctx: Context, arms: dict[int, LexicalArm], eval_windows: TokenWindows, eval_cache: LatentCache,
               fingerprint: str) -> tuple[dict[str, EvalResults], dict[str, ConditionInfo]]:
    """Every all-latent condition on every eval window, per position mode, and each one's measured Pearson r."""
    build, plan = main_conditions(ctx, arms)
    results = {mode: evaluate_cached(ctx.model, eval_windows, build, ctx.out / f"eval_{mode}.json", mode, ctx.cfg,
                                     fingerprint, ctx.stages, ctx.runner)
               for mode in ctx.cfg.position_modes}
    with ctx.stages.timer("measure_pearson"):
        info = measured_info(plan, build, eval_cache, list(range(len(eval_windows))), ctx.out / "conditions.json",
                             fingerprint)
    return results, info


def pool_block(ctx: Context, pool: PoolArm, headline: LexicalArm, eval_windows: TokenWindows,
               eval_cache: LatentCache, base_fp: list, main_fp: str) -> tuple[EvalResults, dict[str, ConditionInfo]]:
    """The LLM pool's conditions on the first ``llm_eval_windows`` eval windows, and each one's measured Pearson r."""
    n = ctx.cfg.llm_eval_windows
    build, plan = pool_conditions(ctx, pool, headline)
    fingerprint = json.dumps(base_fp + [pool.simulator_identity, sorted(pool.texts.items()), main_fp], default=str)
    results = evaluate_cached(ctx.model, eval_windows.subset(list(range(n))), build, ctx.out / "eval_pool.json", "all",
                              ctx.cfg, fingerprint, ctx.stages, ctx.runner)
    return results, measured_info(plan, build, eval_cache, list(range(n)), ctx.out / "conditions_pool.json",
                                  fingerprint)


def llm_call_counts(ctx: Context, backend) -> dict[str, int]:
    """The LLM calls made and answered from the call cache (none under Ray: the calls are made by the workers' own
    copies of the backend, which this process cannot count)."""
    return {k: getattr(backend, k) for k in ("new_calls", "hits") if hasattr(backend, k) and not ctx.runner.parallel}


def run_counts(ctx: Context, arms: dict[int, LexicalArm], pool: PoolArm, calls: dict[str, int]) -> dict[str, int]:
    return {"pool": len(pool.pool), "explained_ok": len(pool.texts),
            "explanations_failed": len(pool.explanations) - len(pool.texts),
            "simulated_nan_predictions": pool.nan_predictions,
            "lexical_explained": len(arms[ctx.cfg.lexical_budget].texts),
            "lexical_parse_fallbacks": sum(a.fallbacks for a in arms.values()), **calls}


def trained_stage(ctx: Context, headline: LexicalArm, explain_doc_ids: list[str], eval_windows: TokenWindows,
                  eval_cache: LatentCache, eval_strings: dict[int, list[str]], base_fp: list
                  ) -> tuple[EvalResults | None, dict[str, ConditionInfo]]:
    """The trained simulator's block (see :mod:`.trained_arm`); nothing unless ``--trained-simulator`` is set."""
    cfg, stages = ctx.cfg, ctx.stages
    if cfg.trained_simulator == "none":
        return None, {}
    with stages.timer("train_simulator"):
        simulator = get_simulator(cfg, ctx.cache, explain_doc_ids)
    calib_ids = trained_calibration_windows(cfg, simulator, ctx.cache)
    windows = trained_windows(cfg, eval_windows)
    with stages.timer("simulate_trained"):
        arm = trained_arm(simulator, headline, ctx.cache, calib_ids, {w: eval_strings[w] for w in range(len(windows))},
                          ctx.out / "simulations" / "trained")
    build, plan = trained_conditions(cfg, TrainedMaterials(ctx.model, ctx.coder, ctx.cache, arm, headline),
                                     coder_site(cfg))
    fingerprint = json.dumps(base_fp + [simulator.identity, calib_ids, len(windows)], default=str)
    results = evaluate_cached(ctx.model, windows, build, ctx.out / "eval_trained.json", "all", cfg, fingerprint, stages,
                              ctx.runner)
    info = measured_info(plan, build, eval_cache, list(range(len(windows))), ctx.out / "conditions_trained.json",
                         fingerprint)
    return results, info
