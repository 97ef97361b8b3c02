"""``nl-rewrite run``: the whole rewrite experiment, stage by stage, each stage resumable.

1. transcoder (cached in the user cache) → 2. latent cache on the ``explain`` split → 3. a pool of latents →
4. explanations → 5. detection scores (the ranking) → 6. simulations of every (pool latent, window) on
explain-split calibration windows and eval-split windows, stored once → 7. calibrators fitted on the explain
split only → 8. the Evaluator on the document-disjoint ``eval`` split, in all-positions and last-token modes,
for the baselines and every (fraction, calibration) → 9. results.json/csv, plots, report.html, manifest.

``fractions`` are fractions of the *pool* (the latents explained and simulated); the pool's share of all
latents is reported. With ``pool=0`` (the paper preset) the pool is every alive latent.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from .calibrate import Calibrator, count_fallbacks, make_calibrator
from .conditions import build_condition
from .data import TokenWindows, token_windows
from .evaluator import EvalResults, Evaluator
from .explain import ExplainConfig, Explanation, explain_latents
from .latents import LatentCache
from .llm.factory import make_backend
from .models import load_model, model_name, prepend_bos_for
from .paths import cache_dir
from .replacements.base import Replacement
from .replacements.simulated import NLSimulatorReplacement, choose_latents, usable_pool
from .run_config import RunConfig
from .sampling import SamplingConfig, select_latents
from .score import DetectionScore, ScoreConfig, score_explanations
from .simulate import Simulator
from .simulation_store import SimulationQuality, SimulationStore, simulate_into_store, simulation_quality
from .sparse_coder import SparseCoder

log = logging.getLogger(__name__)
BASELINES = ("transcoder", "zero_latents", "zero", "mean", "random_latents")
POSITION_MODES = ("all", "last")


def condition_name(calibration: str, fraction: float) -> str:
    return f"sim_{calibration}_f{fraction:g}"


@dataclass
class Stage:
    """Wall-clock seconds per stage, for the manifest."""

    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        log.info("stage %s ...", name)
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 2)
        log.info("stage %s done in %.1fs", name, self.seconds[name])
        return result


@dataclass
class Artifacts:
    """Everything the report needs, produced by :func:`run_experiment`."""

    cfg: RunConfig
    results: dict[str, EvalResults]
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


# ---- stages 1-3: coder, latent cache, pool ------------------------------------------------------------------

def load_transcoder(cfg: RunConfig, model) -> SparseCoder:
    from .train import TrainConfig, default_transcoder, train

    if cfg.transcoder == "default":
        return default_transcoder(model_name(model), cfg.layer, model=model)
    if cfg.transcoder == "small":
        folder = cache_dir() / "coders" / model_name(model) / f"mlp_in.{cfg.layer}-w{cfg.width}-k32-t{cfg.train_tokens}"
        tcfg = TrainConfig(model=model_name(model), layer=cfg.layer, width=cfg.width, tokens=cfg.train_tokens,
                           out=str(folder), seed=cfg.seed)
        return train(tcfg, model=model)
    return SparseCoder.load(cfg.transcoder, model=model)


def windows_for(cfg: RunConfig, model, split: str, n: int) -> TokenWindows:
    return token_windows(model, split, window=cfg.window, max_windows=n, seed=cfg.seed,
                         prepend_bos=prepend_bos_for(cfg.model))


def choose_pool(cfg: RunConfig, cache: LatentCache, min_count: int) -> list[int]:
    n = cfg.pool if cfg.pool > 0 else cache.n_latents
    return select_latents(cache, n, how=cfg.pool_selection, seed=cfg.seed, min_count=min_count)


# ---- stages 4-5: explanations and scores --------------------------------------------------------------------

def sampling_config(cfg: RunConfig) -> SamplingConfig:
    return SamplingConfig(n_train=cfg.n_train_examples, n_heldout=cfg.n_heldout, n_negatives=cfg.n_negatives,
                          seed=cfg.seed)


def explain_and_score(cfg: RunConfig, backend, cache: LatentCache, pool: list[int], out: Path,
                      stages: Stage) -> tuple[list[Explanation], list[DetectionScore]]:
    sampling = sampling_config(cfg)
    ecfg = ExplainConfig(max_tokens=cfg.explain_max_tokens)
    explanations = stages.timed("explain", explain_latents, backend, cache, pool, ecfg, sampling,
                                out / "explanations.jsonl")
    scores = stages.timed("score", score_explanations, backend, cache, explanations, ScoreConfig(), sampling,
                          out / "scores.jsonl")
    return explanations, scores


# ---- stage 6: simulations ----------------------------------------------------------------------------------

def window_strings(cache: LatentCache, windows: TokenWindows) -> dict[int, list[str]]:
    return {i: cache.token_strings(row.tolist()) for i, row in enumerate(windows.tokens)}


def simulate_split(simulator: Simulator, folder: Path, texts: dict[int, str], windows: dict[int, list[str]]
                   ) -> SimulationStore:
    store = SimulationStore(folder, simulator.identity)
    run = simulate_into_store(simulator, store, texts, windows)
    log.info("simulations in %s: %d new, %d reused, %d NaN predictions", folder, run.windows_simulated,
             run.windows_reused, run.nan_predictions)
    return store


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
              calib_ids: list[int]) -> tuple[dict[str, dict[int, Calibrator]], dict[str, dict[int, SimulationQuality]]]:
    calibrators: dict[str, dict[int, Calibrator]] = {k: {} for k in cfg.calibrations}
    quality: dict[str, dict[int, SimulationQuality]] = {k: {} for k in cfg.calibrations}
    for latent, text in texts.items():
        sims = store.get(latent, text, calib_ids).reshape(-1)
        acts = true_activations(cache, calib_ids, latent)
        for kind in cfg.calibrations:
            cal = fit_calibrator(kind, latent, sims, acts, cache)
            calibrators[kind][latent] = cal
            quality[kind][latent] = simulation_quality(latent, sims, acts, cal(sims))
    return calibrators, quality


# ---- stage 8: evaluation ------------------------------------------------------------------------------------

def simulated_conditions(cfg: RunConfig, transcoder: SparseCoder, sims: dict[int, dict[int, Tensor]],
                         calibrators: dict[str, dict[int, Calibrator]], chosen: dict[float, list[int]]
                         ) -> list[Replacement]:
    return [NLSimulatorReplacement(transcoder, {lat: sims[lat] for lat in chosen[f]}, calibrators[kind], chosen[f],
                                   name=condition_name(kind, f))
            for kind in cfg.calibrations for f in cfg.fractions]


def evaluate_modes(cfg: RunConfig, model, windows: TokenWindows, build: Callable[[], list[Replacement]], out: Path,
                   fingerprint: str, stages: Stage) -> dict[str, EvalResults]:
    """One Evaluator run per position mode; a finished mode with the same fingerprint is reused, and the
    conditions are only built (mean ablation needs a pass over train windows) when something is left to run."""
    results: dict[str, EvalResults] = {}
    conditions: list[Replacement] = []
    for mode in POSITION_MODES:
        path = out / f"eval_{mode}.json"
        if path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint:
            results[mode] = EvalResults.from_json(json.loads(path.read_text())["results"])
            continue
        conditions = conditions or build()
        res = stages.timed(f"evaluate_{mode}", Evaluator(model, windows, cfg.batch_size, mode, seed=cfg.seed).run,
                           conditions)
        _write_json(path, {"fingerprint": fingerprint, "results": res.to_json()})
        results[mode] = res
    return results


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


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


# ---- the driver -----------------------------------------------------------------------------------------------

def run_experiment(cfg: RunConfig) -> Artifacts:
    """Run (or resume) the experiment ``cfg`` describes; writes into ``cfg.out`` and returns the artifacts."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stage()
    torch.manual_seed(cfg.seed)
    model = stages.timed("load_model", load_model, cfg.model)
    if cfg.layer < 0:
        from .train import DEFAULT_LAYER

        cfg.layer = DEFAULT_LAYER
    transcoder = stages.timed("transcoder", load_transcoder, cfg, model)
    explain_windows = windows_for(cfg, model, "explain", cfg.explain_windows)
    cache = stages.timed("latent_cache", LatentCache.build, model, transcoder, explain_windows, out / "latents")
    pool = choose_pool(cfg, cache, min_count=max(2, cfg.n_heldout))
    backend = make_backend(cfg.llm, cache=cache_dir() / "llm_calls.sqlite")
    explanations, scores = explain_and_score(cfg, backend, cache, pool, out, stages)
    usable, _ = usable_pool(explanations)
    texts = {r.latent: r.text for r in explanations if r.latent in set(usable)}
    simulator = Simulator(backend, cfg.simulator_mode)
    calib_ids = sorted(random.Random(cfg.seed).sample(range(len(cache)), min(cfg.calib_windows, len(cache))))
    calib_store = stages.timed("simulate_explain", simulate_split, simulator, out / "simulations" / "explain", texts,
                               {w: cache.token_strings(cache.window_tokens(w)) for w in calib_ids})
    eval_windows = windows_for(cfg, model, "eval", cfg.eval_windows)
    eval_store = stages.timed("simulate_eval", simulate_split, simulator, out / "simulations" / "eval", texts,
                              window_strings(cache, eval_windows))
    calibrators, quality = stages.timed("calibrate", calibrate, cfg, cache, calib_store, texts, calib_ids)
    chosen = fraction_choices(cfg, list(texts), scores, quality)
    eval_sims = {lat: eval_store.load(lat, text) for lat, text in texts.items()}

    def build() -> list[Replacement]:
        baselines = [build_condition(name, model, cfg.layer, lambda: transcoder, cfg.seed) for name in BASELINES]
        return baselines + simulated_conditions(cfg, transcoder, eval_sims, calibrators, chosen)

    fingerprint = json.dumps([cfg.to_dict(), simulator.identity, sorted(texts.items())], default=str)
    results = evaluate_modes(cfg, model, eval_windows, build, out, fingerprint, stages)
    backend_counts = {k: getattr(backend, k) for k in ("new_calls", "hits") if hasattr(backend, k)}
    counts = {"pool": len(pool), "explained_ok": len(texts), "explanations_failed": len(explanations) - len(texts),
              "simulated_nan_predictions": simulator.stats.nan_predictions, **backend_counts}
    return Artifacts(cfg, results, explanations, scores, quality, list(texts), cache.n_latents, chosen,
                     {k: count_fallbacks(v.values()) for k, v in calibrators.items()}, counts, stages.seconds,
                     cache.token_strings)
