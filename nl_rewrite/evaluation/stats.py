"""Statistics over windows: bootstrap CIs and paired tests.

Tokens within a window are correlated, so every resampling here is over *windows* (a cluster
bootstrap), and paired tests compare per-window means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

CIBounds = tuple[float, float]
"""A confidence interval's ends, (low, high)."""


def bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> torch.Tensor:
    """``[n_bootstrap, n]`` resampled window indices; the same seed gives the same resamples for every condition."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_bootstrap, n), generator=gen)


def mean_ci(per_window: Float[Tensor, " n"], resamples: torch.Tensor, level: float = 0.95) -> CIBounds:
    """Percentile bootstrap CI of the mean of per-window values."""
    means = per_window[resamples].mean(dim=1)
    return _percentiles(means, level)


@dataclass(frozen=True)
class RatioCI:
    """A percentile bootstrap CI of a ratio, and how many resamples had no defined ratio.

    Unpacks as the pair ``lo, hi`` (like :func:`mean_ci`'s tuples); ``undefined`` and ``n_resamples`` say how
    much of the bootstrap distribution is missing."""

    lo: float
    hi: float
    undefined: int
    """Resamples whose mean denominator is not positive (or not finite): they have no meaningful ratio."""
    n_resamples: int
    level: float = 0.95

    def __iter__(self) -> Iterator[float]:
        return iter((self.lo, self.hi))

    @property
    def undefined_share(self) -> float:
        return self.undefined / self.n_resamples if self.n_resamples else math.nan

    @property
    def reliable(self) -> bool:
        """At most one tail's worth of resamples (2.5% for a 95% CI) lacks a ratio.

        Beyond that, the percentile on that side would be read off resamples that have no ratio at all, so the
        interval (and the ratio itself) should be called undefined rather than printed."""
        return self.n_resamples > 0 and self.undefined <= (1 - self.level) / 2 * self.n_resamples


def ratio_ci(numer: Float[Tensor, " n"], denom: Float[Tensor, " n"], resamples: torch.Tensor,
             level: float = 0.95) -> RatioCI:
    """Percentile bootstrap CI of mean(numer) / mean(denom), resampling windows jointly.

    Meant for fractions of a gap, whose denominator must be positive. A resample whose mean denominator is not
    positive has no meaningful ratio: it is counted in ``undefined`` and enters the percentiles as ±inf (by the sign
    of its numerator; a zero or NaN numerator drops it) rather than being silently dropped, so the CI keeps the
    tail it stands for. Check ``.reliable`` (or ``.undefined``) before quoting the interval."""
    num_s, den_s = numer[resamples].double().mean(dim=1), denom[resamples].double().mean(dim=1)
    ok = den_s > 0  # False for NaN too
    ratios = torch.where(ok, num_s / torch.where(ok, den_s, 1.0), torch.sign(num_s) * math.inf)
    lo, hi = _percentiles(ratios[~torch.isnan(ratios)], level)
    return RatioCI(lo, hi, int((~ok).sum()), int(den_s.numel()), level)


def _percentiles(samples: Tensor, level: float) -> CIBounds:
    if samples.numel() == 0 or bool(torch.isnan(samples).any()):
        return (math.nan, math.nan)
    alpha = (1 - level) / 2
    ordered = torch.sort(samples.double().flatten()).values.tolist()
    return _quantile(ordered, alpha), _quantile(ordered, 1 - alpha)


def _quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (as ``torch.quantile``), which also copes with ±inf: a quantile
    that falls next to an infinite sample is that infinity (``torch.quantile`` gives NaN between two equal ones)."""
    pos = q * (len(ordered) - 1)
    i, j = math.floor(pos), math.ceil(pos)
    a, b = ordered[i], ordered[j]
    if a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        return math.nan if math.isinf(a) and math.isinf(b) else (a if math.isinf(a) else b)
    return a + (pos - i) * (b - a)


def paired_wilcoxon(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Two-sided Wilcoxon signed-rank p-value for paired per-window values (1.0 when all differences are 0)."""
    from scipy.stats import wilcoxon

    if a.shape != b.shape:
        raise ValueError(f"paired test needs equal lengths, got {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a - b).double()
    if bool((diff == 0).all()):
        return 1.0
    return float(wilcoxon(a.double().numpy(), b.double().numpy()).pvalue)
