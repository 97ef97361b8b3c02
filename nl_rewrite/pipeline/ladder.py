"""Simulators that cover every latent, and the oracle ladder they are measured against.

- **Lexical arms**: one per explanation budget. Lexical explanations are written from the ``explain`` split's
  statistics (windows not used for calibration), read back by :class:`.lexical.LexicalSimulator` (all latents
  on all windows in seconds, so recomputed on a rerun rather than stored), calibrated per latent on held-out
  ``explain`` windows and patched through :class:`NLSimulatorReplacement`.
- **Oracles**: true, binary and noise-degraded activations (:mod:`.replacements.oracles`), with the noise
  set on ``explain`` windows to reach each target Pearson r.

Nothing here reads an eval window's activations except :func:`eval_pearson`, which *measures* a condition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.interp.calibrate import Calibrator, LinearCalibrator, make_calibrator
from nl_rewrite.interp.explain import Explanation
from nl_rewrite.io import RecordStore
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.interp.lexical import LEXICAL_VERSION, Candidates, LexicalSimulator, explanation_problems, lexical_explanations
from nl_rewrite.replacements.oracles import OracleReplacement, mean_pearson, noise_multiplier
from nl_rewrite.replacements.simulated import NLSimulatorReplacement
from nl_rewrite.interp.simulation_store import SimulationQuality, simulation_quality
from nl_rewrite.interp.window_rows import WindowRows
from nl_rewrite.coders.sparse_coder import SparseCoder

log = logging.getLogger(__name__)
LEXICAL_CALIBRATION = "isotonic"
"""Lexical scores are small integers (sums of strengths); isotonic regression maps them to activations."""
TOKENS_AS_ROWS = "window pos latent -> (window pos) latent"
"""Dense per-window latent values as one row per token, the layout calibrators and correlations are fitted on."""


@runtime_checkable
class WindowSimulator(Protocol):
    """Simulates every latent of ``explanations`` on equal-length windows at once: latent → scores [window, pos]."""

    def simulate_windows(self, explanations: Mapping[int, str], windows: Sequence[Sequence[str]]
                         ) -> Mapping[int, Tensor]: ...


@dataclass
class LexicalArm:
    """Explanations of every latent, read by one simulator, calibrated per latent (the lexical arms; also the trained
    simulator's arm, which reads the headline lexical explanations)."""

    budget: int
    texts: dict[int, str]
    calibrators: dict[int, Calibrator]
    quality: dict[int, SimulationQuality]
    """Per latent, on the held-out explain-split calibration windows."""
    eval_sims: dict[int, Mapping[int, Tensor]]
    """latent → window id → raw simulated scores ``[pos]``."""
    fallbacks: int
    """Explanations the reader could not parse."""
    linear_calibrations: int = 0
    """Latents that never fired on the calibration windows: calibrated linearly (strength 9 → their mean active
    value on the explain split) instead of by isotonic regression."""

    def ranking(self) -> dict[int, float]:
        """latent → held-out Pearson r: the lexical explanation's score, used to order fraction sweeps."""
        return {lat: q.pearson for lat, q in self.quality.items()}


def save_explanations(path: Path, texts: Mapping[int, str], budget: int) -> None:
    """Store lexical explanations as :class:`Explanation` records, like the LLM's (JSONL, resumable)."""
    store = RecordStore(path, f"lexical|v{LEXICAL_VERSION}|budget={budget}", Explanation.from_dict)
    new = [Explanation(lat, text, True, prompt="", examples=[], settings=store.settings)
           for lat, text in texts.items() if lat not in store.records or store.records[lat].text != text]
    if new:
        store.add(new)


def lexical_arm(cache: LatentCache, stat_ids: Sequence[int], calib_ids: Sequence[int], candidates: Candidates,
                budget: int, eval_windows: Mapping[int, list[str]], out: Path) -> LexicalArm:
    """Explain every latent with at most ``budget`` items, simulate, calibrate (see the module docstring)."""
    texts = lexical_explanations(cache, stat_ids, budget, candidates)
    save_explanations(out / f"explanations_lexical_b{budget}.jsonl", texts, budget)
    arm = simulated_arm(LexicalSimulator(), texts, budget, cache, calib_ids, eval_windows)
    log.info("lexical budget %d: %d latents explained, %d unparseable, %d with partial parse problems, %d calibrated "
             "linearly (never fired on the %d calibration windows)", budget, len(texts), arm.fallbacks,
             explanation_problems(texts)[1], arm.linear_calibrations, len(calib_ids))
    return arm


def simulated_arm(simulator: WindowSimulator, texts: dict[int, str], budget: int, cache: LatentCache,
                  calib_ids: Sequence[int], eval_windows: Mapping[int, list[str]]) -> LexicalArm:
    """Simulate ``texts`` on the held-out explain windows ``calib_ids``, calibrate per latent, then simulate the eval
    windows. ``simulator`` is the lexical reader or the trained simulator (anything with ``simulate_windows``)."""
    calib_windows = [cache.token_strings(cache.window_tokens(w)) for w in calib_ids]
    calib_sims = simulator.simulate_windows(texts, calib_windows)
    acts = rearrange(cache.dense_windows(calib_ids), TOKENS_AS_ROWS)
    calibrators, quality = {}, {}
    for lat in texts:
        sims = calib_sims[lat].reshape(-1)
        calibrators[lat] = calibrated(lat, sims, acts[:, lat], cache)
        quality[lat] = simulation_quality(lat, sims, acts[:, lat], calibrators[lat](sims), rank_correlation=False)
    linear = sum(1 for c in calibrators.values() if isinstance(c, LinearCalibrator))
    unparseable, _ = explanation_problems(texts)  # counted from the texts, so a resumed run counts the same
    ids = list(eval_windows)
    position = {w: i for i, w in enumerate(ids)}  # one index for every latent's rows
    eval_sims = {lat: WindowRows(ids, rows, position)
                 for lat, rows in simulator.simulate_windows(texts, [eval_windows[w] for w in ids]).items()}
    return LexicalArm(budget, texts, calibrators, quality, eval_sims, unparseable, linear)


def calibrated(latent: int, sims: Tensor, acts: Tensor, cache: LatentCache) -> Calibrator:
    """Isotonic on held-out explain windows; a latent that never fired there maps strength 9 to its mean value."""
    iso = make_calibrator(LEXICAL_CALIBRATION, latent).fit(sims, acts)
    if not iso.fallback:
        return iso
    mean_active = float(torch.nan_to_num(cache.stats.mean[latent].float(), nan=0.0))
    return LinearCalibrator(latent=latent).fit_max(mean_active)


def lexical_condition(transcoder: SparseCoder, arm: LexicalArm, latents: Sequence[int], name: str
                      ) -> NLSimulatorReplacement:
    chosen = [lat for lat in latents if lat in arm.texts]
    return NLSimulatorReplacement(transcoder, {lat: arm.eval_sims[lat] for lat in chosen},
                                  {lat: arm.calibrators[lat] for lat in chosen}, chosen, name=name)


# ---- oracles -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoiseTargets:
    """Noise scale per latent for each target correlation, fitted on explain-split windows."""

    sd: Float[Tensor, " n_latents"]
    multipliers: dict[float, float]


def fit_noise(cache: LatentCache, calib_ids: Sequence[int], targets: Sequence[float], seed: int) -> NoiseTargets:
    acts = rearrange(cache.dense_windows(calib_ids), TOKENS_AS_ROWS)
    return NoiseTargets(acts.std(0), {r: noise_multiplier(acts, r, seed) for r in targets})


def noisy_name(target: float) -> str:
    return f"noisy_r{target:g}"


def mean_active(cache: LatentCache) -> Float[Tensor, " n_latents"]:
    """Each latent's mean value when it fires (0 for one that never fired): what the binary oracle writes."""
    return torch.nan_to_num(cache.stats.mean.float(), nan=0.0)


def zeroed_condition(transcoder: SparseCoder, latents: list[int], name: str) -> OracleReplacement:
    """The chosen latents predicted as 0 everywhere (then TopK): the reference a pool simulator must beat."""
    return OracleReplacement(transcoder, "binary", latents, mean_active=torch.zeros(transcoder.cfg.n_latents),
                             name=name)


# ---- measuring a condition's correlation on eval ---------------------------------------------------------------

def eval_pearson(condition, eval_cache: LatentCache, window_ids: Sequence[int]) -> float:
    """Mean per-latent Pearson r between what ``condition`` writes for its latents and their true eval values."""
    ids = torch.as_tensor(list(window_ids))
    true = eval_cache.dense_windows(window_ids)
    if isinstance(condition, OracleReplacement):
        chosen = condition.ids
        pred = condition.degrade(true[..., chosen], ids)
    else:
        chosen = torch.as_tensor(condition.latents, dtype=torch.long)
        if not len(chosen):
            return float("nan")
        pred = condition.values(ids, true.shape[1])
    return mean_pearson(rearrange(pred, TOKENS_AS_ROWS), rearrange(true[..., chosen], TOKENS_AS_ROWS))
