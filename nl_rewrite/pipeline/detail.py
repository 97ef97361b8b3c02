"""What detail in an explanation buys: reference arms and diagnostics for comparing explanation languages.

- **Context lookups**: every latent predicted by its mean activation given the current token, or given the previous
  and current tokens (backing off to the current token where that pair was seen fewer than ``min_count`` times),
  from the same statistics windows as the explanations, with no length limit. They show what the statistics
  themselves carry. They are not calibrated, so they are no upper bound for a calibrated arm: at MLP 10 the
  calibrated 400-character explanations recovered more than the pair lookup (docs/results.md).
- **Swaps** (:mod:`nl_rewrite.replacements.swaps`): true values where the simulation fires (what the firings it
  misses cost), and simulated values where the latent truly fires (what its magnitudes cost, false positives removed).
- **Firing AUROC** per latent (raw simulated score against "truly fires") and firing error rates.
- **The explanations that most need work**: latents ranked by the estimated output cost of their simulation errors.

Everything here *measures* on eval windows; statistics and calibration come from explain windows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from scipy.stats import rankdata
from torch import Tensor

from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.interp.calibrate import Uncalibrated
from nl_rewrite.interp.lexical import TokenActivations
from nl_rewrite.pipeline.results import FiringErrors, NeedsWork
from nl_rewrite.replacements.oracles import MIN_FIRES
from nl_rewrite.replacements.simulated import NLSimulatorReplacement
from nl_rewrite.replacements.swaps import firing

LOOKUP_MIN_COUNT = 3
"""A (previous, current) pair seen fewer times backs off to the current token's mean."""


def _sparse_means(keys: Int[Tensor, " r"], latents: Int[Tensor, " r"], values: Tensor, counts: Tensor,
                  n_keys: int, n_latents: int) -> Tensor:
    """A sparse [key, latent] table of Σ value / count(key)."""
    table = torch.sparse_coo_tensor(torch.stack([keys, latents]), values.double(), (n_keys, n_latents)).coalesce()
    index = table.indices()
    return torch.sparse_coo_tensor(index, table.values() / counts[index[0]].double(), (n_keys, n_latents)).coalesce()


def context_lookup(cache: TokenActivations, stat_ids: Sequence[int], windows: Int[Tensor, "n pos"], pairs: bool,
                   min_count: int = LOOKUP_MIN_COUNT) -> Float[Tensor, "n pos n_latents"]:
    """Mean activation of every latent given each position's context in ``windows`` (see the module docstring)."""
    tokens = cache.tokens.long()
    vocab = max(int(tokens.max()), int(windows.max())) + 1
    stats = tokens[torch.as_tensor(list(stat_ids), dtype=torch.long)]
    rows = cache.rows(stat_ids)
    w, p, lat, val = rows["window_ids"].long(), rows["positions"].long(), rows["latent_ids"].long(), rows["values"]
    current = _sparse_means(tokens[w, p], lat, val, torch.bincount(stats.reshape(-1), minlength=vocab), vocab,
                            cache.n_latents)
    n, pos = windows.shape
    out = current.index_select(0, windows.reshape(-1).long()).to_dense().float().reshape(n, pos, -1)
    if not pairs:
        return out
    bigrams, counts = torch.unique(stats[:, :-1] * vocab + stats[:, 1:], return_counts=True)
    has = p > 0
    index = torch.searchsorted(bigrams, tokens[w[has], p[has] - 1] * vocab + tokens[w[has], p[has]])
    pair = _sparse_means(index, lat[has], val[has], counts, len(bigrams), cache.n_latents)
    queries = (windows[:, :-1].long() * vocab + windows[:, 1:].long()).reshape(-1)
    found = torch.searchsorted(bigrams, queries).clamp_max(len(bigrams) - 1)
    seen = (bigrams[found] == queries) & (counts[found] >= min_count)
    later = out[:, 1:].reshape(-1, cache.n_latents)
    later[seen] = pair.index_select(0, found[seen]).to_dense().float()
    out[:, 1:] = later.reshape(n, pos - 1, -1)
    return out


def values_condition(coder: SparseCoder, values: Float[Tensor, "n pos n_latents"], name: str
                     ) -> NLSimulatorReplacement:
    """A condition writing ``values`` (activations, not scores) for every latent on eval windows 0..n-1."""
    simulations = {lat: dict(enumerate(values[..., lat].unbind(0))) for lat in range(values.shape[-1])}
    calibrators = {lat: Uncalibrated(latent=lat) for lat in range(values.shape[-1])}
    return NLSimulatorReplacement(coder, simulations, calibrators, list(range(values.shape[-1])), name)


def dense_values(condition: NLSimulatorReplacement, window_ids: Sequence[int], n_pos: int
                 ) -> Float[Tensor, "n pos n_latents"]:
    """What ``condition`` writes for all its latents (calibrated) on ``window_ids``, in latent order."""
    values = condition.values(torch.as_tensor(list(window_ids), dtype=torch.long), n_pos)
    out = torch.zeros(*values.shape[:2], max(condition.latents) + 1)
    out[..., condition.latents] = values
    return out


def firing_counts(simulated: Float[Tensor, "... n_latents"], true: Float[Tensor, "... n_latents"], k: int
                  ) -> Int[Tensor, " 4"]:
    """(simulated firings, false positives among them, true firings, misses among them), after TopK: summed over
    chunks of windows, they give :meth:`FiringErrors.of`."""
    fires, truly = firing(simulated, k), true > 0
    return torch.stack([fires.sum(), (fires & ~truly).sum(), truly.sum(), (truly & ~fires).sum()])


def firing_errors(simulated: Float[Tensor, "... n_latents"], true: Float[Tensor, "... n_latents"], k: int
                  ) -> FiringErrors:
    return FiringErrors.of(firing_counts(simulated, true, k))


def firing_auroc(scores: Float[Tensor, "tokens n_latents"], true: Float[Tensor, "tokens n_latents"],
                 min_fires: int = MIN_FIRES) -> float:
    """Mean over latents (firing at least ``min_fires`` times, and not everywhere) of the AUROC of the raw score
    for "truly fires": the chance a random firing token scores above a random silent one (ties count half)."""
    fires = true > 0
    n1 = fires.sum(0).double()
    n0 = fires.shape[0] - n1
    keep = (n1 >= min_fires) & (n0 > 0)
    if not keep.any():
        return math.nan
    ranks = torch.from_numpy(rankdata(scores[:, keep].double().numpy(), axis=0))
    n1k, n0k = n1[keep], n0[keep]
    auroc = ((ranks * fires[:, keep]).sum(0) - n1k * (n1k + 1) / 2) / (n1k * n0k)
    return float(auroc.mean())


def arm_scores(simulations: Mapping[int, Mapping[int, Tensor]], n_windows: int, n_latents: int
               ) -> Float[Tensor, "n pos n_latents"]:
    """Raw simulated scores (latent → window → [pos]) as one dense tensor."""
    return torch.stack([torch.stack([simulations[lat][w] for w in range(n_windows)]) for lat in range(n_latents)], -1)


def output_error(simulated: Float[Tensor, "n pos n_latents"], true: Float[Tensor, "n pos n_latents"],
                 weights: Float[Tensor, " n_latents"]) -> Float[Tensor, " n_latents"]:
    """Each latent's estimated cost at the coder's output: its summed squared simulation error times its squared
    decoder-row norm (cross terms between latents ignored). Patching the top latents alone checks the estimate."""
    return (simulated.double() - true.double()).pow(2).sum((0, 1)) * weights.double()


def needs_work(cost: Float[Tensor, " n_latents"], texts: Mapping[int, str], n: int) -> list[NeedsWork]:
    """The ``n`` latents of largest estimated output cost (:func:`output_error`), the costliest first (ties by id)."""
    total = float(cost.sum()) or 1.0
    return [NeedsWork(lat, float(cost[lat]) / total, texts.get(lat, ""))
            for lat in torch.argsort(cost, descending=True, stable=True)[:n].tolist()]
