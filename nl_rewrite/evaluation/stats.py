"""Statistics over windows: bootstrap CIs and paired tests.

Tokens within a window are correlated, so every resampling here is over *windows* (a cluster
bootstrap), and paired tests compare per-window means.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor


def bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> torch.Tensor:
    """``[n_bootstrap, n]`` resampled window indices; the same seed gives the same resamples for every condition."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_bootstrap, n), generator=gen)


def mean_ci(per_window: Float[Tensor, " n"], resamples: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-window values."""
    means = per_window[resamples].mean(dim=1)
    return _percentiles(means, level)


def ratio_ci(numer: Float[Tensor, " n"], denom: Float[Tensor, " n"], resamples: torch.Tensor,
             level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(numer) / mean(denom), resampling windows jointly."""
    ratios = numer[resamples].mean(dim=1) / denom[resamples].mean(dim=1)
    return _percentiles(ratios[torch.isfinite(ratios)], level)


def _percentiles(samples: Tensor, level: float) -> tuple[float, float]:
    if samples.numel() == 0:
        return (math.nan, math.nan)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(samples.double(), torch.tensor([alpha, 1 - alpha], dtype=torch.double))
    return float(lo), float(hi)


def paired_wilcoxon(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Two-sided Wilcoxon signed-rank p-value for paired per-window values (1.0 when all differences are 0)."""
    from scipy.stats import wilcoxon

    if a.shape != b.shape:
        raise ValueError(f"paired test needs equal lengths, got {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a - b).double()
    if bool((diff == 0).all()):
        return 1.0
    return float(wilcoxon(a.double().numpy(), b.double().numpy()).pvalue)
