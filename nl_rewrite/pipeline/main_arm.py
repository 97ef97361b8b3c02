"""The conditions over all latents on every eval window: the coder and the baselines, the oracle ladder, one lexical
arm per budget, the headline arm's two swaps (:mod:`nl_rewrite.replacements.swaps`), and per sweep fraction the
best-explained latents, lexically and as binary oracle."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.pipeline.conditions import Planned, planned_baseline
from nl_rewrite.pipeline.detail import dense_values, firing_counts, needs_work, output_error
from nl_rewrite.pipeline.results import Diagnostics, FiringErrors
from nl_rewrite.pipeline.stage import cached
from nl_rewrite.pipeline.ladder import (LexicalArm, NoiseTargets, fit_noise, lexical_arm, lexical_condition,
                                        mean_active, noisy_name)
from nl_rewrite.interp.lexical import candidate_items
from nl_rewrite.replacements.base import Replacement
from nl_rewrite.replacements.oracles import OracleReplacement
from nl_rewrite.replacements.simulated import NLSimulatorReplacement
from nl_rewrite.replacements.swaps import SWAP_PREFIX, SWAPS, Swap, SwapReplacement
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.hashing import digest
from nl_rewrite.pipeline.run_context import Context, RunMaterials, coder_site, heldout_windows, reference_planned


HEADLINE_LEXICAL = "lexical"
NEEDS_WORK = 20
"""Explanations listed in the report as those whose simulation errors cost the most."""
DIAGNOSE_WINDOWS = 64
"""Eval windows diagnosed at once: dense tables of every latent stay small (64 × 32 × 4096 floats, 34 MB)."""


def arm_digest(arm: LexicalArm) -> str:
    """Hash of an arm's explanations and fitted calibrators: cached evaluations depend on both."""
    payload = json.dumps([sorted(arm.texts.items()), [arm.calibrators[k].to_dict() for k in sorted(arm.calibrators)]],
                         default=str)
    return digest(payload)


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

    @cached_property
    def headline_condition(self) -> NLSimulatorReplacement:
        """The headline arm over every latent, built once for itself and its swaps (its table is the largest)."""
        return lexical_condition(self.coder, self.headline, range(len(self.ranking)), HEADLINE_LEXICAL)


def _true_oracle(m: MainMaterials, name: str) -> Replacement:
    return OracleReplacement(m.coder, "true", None, name=name)


def _binary_oracle(m: MainMaterials, name: str, fraction: float = 1.0) -> Replacement:
    return OracleReplacement(m.coder, "binary", None if fraction == 1.0 else m.top(fraction),
                             mean_active=mean_active(m.ctx.cache), name=name)


def _noisy_oracle(m: MainMaterials, name: str, target: float) -> Replacement:
    return OracleReplacement(m.coder, "noisy", None, noise_sd=m.noise.multipliers[target] * m.noise.sd,
                             seed=m.ctx.cfg.seed, name=name)


def _lexical(m: MainMaterials, name: str, budget: int, fraction: float = 1.0) -> Replacement:
    if name == HEADLINE_LEXICAL:  # declared with the headline budget over every latent
        return m.headline_condition
    latents = range(len(m.ranking)) if fraction == 1.0 else m.top(fraction)
    return lexical_condition(m.coder, m.arms[budget], latents, name)


def _swap(m: MainMaterials, name: str, keep: Swap) -> Replacement:
    return SwapReplacement(m.headline_condition, keep, name)


SWAP_LABELS: dict[Swap, str] = {"simulated_firing": "its firing pattern, true values",
                                "true_firing": "true firing pattern, its values"}


def main_planned(cfg: RunConfig) -> list[Planned[MainMaterials]]:
    """Every condition evaluated on all eval windows, in order: the coder and the baselines, the oracle ladder, one
    lexical arm per budget, the headline arm's swaps, and per sweep fraction the best-explained latents lexically and
    as binary oracle."""
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
          for b in sorted(set(cfg.lexical_budgets) - {cfg.lexical_budget})],
        *[Planned(SWAP_PREFIX + keep, "diagnostic", 1.0, f"lexical ≤{cfg.lexical_budget} items: {SWAP_LABELS[keep]}",
                  functools.partial(_swap, keep=keep)) for keep in SWAPS]]
    for f in cfg.sweep_fractions:
        planned += [Planned(f"lexical_f{f:g}", "lexical", f, f"lexical, {100 * f:g}% of latents",
                            functools.partial(_lexical, budget=cfg.lexical_budget, fraction=f)),
                    Planned(f"binary_oracle_f{f:g}", "oracle", f, f"binary oracle, {100 * f:g}% of latents",
                            functools.partial(_binary_oracle, fraction=f))]
    return planned


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


def _finite_or(value: float | None, default: float) -> float:
    return value if value is not None and value == value else default


def diagnose(ctx: Context, headline: LexicalArm, eval_cache: LatentCache, fingerprint: str) -> Diagnostics:
    """The headline arm's firing errors on the eval windows and its explanations that most need work (cached by
    fingerprint; its swaps are conditions of the main block)."""
    def compute() -> Diagnostics:
        n_windows, n_latents = len(eval_cache), ctx.coder.cfg.n_latents
        condition = lexical_condition(ctx.coder, headline, range(n_latents), HEADLINE_LEXICAL)
        weights = ctx.coder.W_dec.detach().norm(dim=-1).cpu() ** 2
        counts, cost = torch.zeros(4, dtype=torch.long), torch.zeros(n_latents, dtype=torch.float64)
        for start in range(0, n_windows, DIAGNOSE_WINDOWS):
            ids = range(start, min(start + DIAGNOSE_WINDOWS, n_windows))
            true = eval_cache.dense_windows(ids)
            simulated = dense_values(condition, ids, true.shape[1])
            counts += firing_counts(simulated, true, ctx.coder.cfg.k)
            cost += output_error(simulated, true, weights)
        return Diagnostics(HEADLINE_LEXICAL, FiringErrors.of(counts), needs_work(cost, headline.texts, NEEDS_WORK))

    return cached(ctx.out / f"diagnostics_n{NEEDS_WORK}.json", fingerprint, Diagnostics, compute)
