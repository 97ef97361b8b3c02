"""How much of the gap between two references a condition recovers, on CE and on KL, with honest statistics.

The gap is ``M(worse) − M(better)`` (by default zero_latents minus transcoder), per window, for M = CE and
M = KL(clean‖patched). A condition's recovered fraction is ``(M_worse − M_c) / (M_worse − M_better)`` (ratio of
window means), with a paired percentile bootstrap over windows (:func:`~nl_rewrite.evaluation.stats.ratio_ci`): the
same resampled windows for numerator and denominator. Resamples whose denominator is not positive have an undefined
ratio: they are counted (``nonpositive_denominators``), and :func:`describe` and the report say how many whenever any
did. When they exceed the CI's tail mass (2.5%), or the gap's own CI reaches 0, the fraction is *undefined* and no
number is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import torch
from pydantic_core import core_schema
from torch import Tensor

from nl_rewrite.evaluation.evaluator import EvalResults
from nl_rewrite.evaluation.stats import bootstrap_indices, mean_ci, paired_wilcoxon, ratio_ci

Metric = Literal["ce", "kl"]
V = TypeVar("V")
METRICS: tuple[Metric, ...] = ("ce", "kl")
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    value: float
    lo: float
    hi: float

    def as_list(self) -> list[float]:
        return [self.value, self.lo, self.hi]

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    @classmethod
    def __get_pydantic_core_schema__(cls, source: object, handler: object) -> core_schema.CoreSchema:
        """In a results file an interval is the list ``[value, lo, hi]``: pydantic reads and writes it so (the
        layout results.json has always had)."""
        triple = core_schema.tuple_schema([core_schema.float_schema()] * 3)
        return core_schema.no_info_after_validator_function(
            lambda values: cls(*values), triple,
            serialization=core_schema.plain_serializer_function_ser_schema(cls.as_list))


@dataclass(frozen=True)
class Recovered:
    """One condition's recovered fraction on one metric. ``fraction`` is None when undefined."""

    fraction: Interval | None
    nonpositive_denominators: int
    n_resamples: int
    p_vs_worse: float
    """Paired Wilcoxon p-value of per-window M against the worse reference."""
    p_vs_better: float
    reason: str = ""
    """Why the fraction is undefined (empty when defined)."""


class ByMetric(Generic[V]):
    """A value on each metric, read by the metric's name (the subclass, a dataclass, declares the two fields)."""

    ce: V
    kl: V

    def on(self, metric: Metric) -> V:
        return self.ce if metric == "ce" else self.kl


@dataclass(frozen=True)
class Gap(ByMetric[Interval]):
    """The gap ``M(worse) − M(better)`` on both metrics."""

    ce: Interval
    kl: Interval


@dataclass(frozen=True)
class Recovery(ByMetric[Recovered]):
    """One condition's recovered fraction of a gap on both metrics."""

    ce: Recovered
    kl: Recovered


def _metric(res: EvalResults, metric: str, name: str) -> Tensor:
    table = res.ce if metric == "ce" else res.kl
    if name not in table:
        raise KeyError(f"no condition {name!r} in the results; have {', '.join(table)}")
    return torch.tensor(table[name], dtype=torch.double)


def gap(res: EvalResults, metric: str, worse: str = "zero_latents", better: str = "transcoder") -> Interval:
    """Mean per-window ``M_worse − M_better`` with its window-bootstrap CI."""
    diff = _metric(res, metric, worse) - _metric(res, metric, better)
    return Interval(float(diff.mean()), *mean_ci(diff, bootstrap_indices(len(diff), res.n_bootstrap, res.seed), LEVEL))


def gaps(res: EvalResults, worse: str = "zero_latents", better: str = "transcoder") -> Gap:
    """:func:`gap` on CE and on KL."""
    return Gap(gap(res, "ce", worse, better), gap(res, "kl", worse, better))


def recovered(res: EvalResults, name: str, metric: str, worse: str = "zero_latents",
              better: str = "transcoder") -> Recovered:
    w, b, c = _metric(res, metric, worse), _metric(res, metric, better), _metric(res, metric, name)
    numer, denom = w - c, w - b
    ci = ratio_ci(numer, denom, bootstrap_indices(len(w), res.n_bootstrap, res.seed), LEVEL)
    bad, n = ci.undefined, ci.n_resamples
    p_worse, p_better = paired_wilcoxon(c, w), paired_wilcoxon(c, b)
    g = gap(res, metric, worse, better)
    if not g.lo > 0:
        sign = "negative" if g.hi < 0 else "not significant"
        reason = f"gap {worse} − {better} {sign}: 95% CI [{g.lo:+.4f}, {g.hi:+.4f}] does not lie above 0"
        return Recovered(None, bad, n, p_worse, p_better, reason)
    if not ci.reliable:
        return Recovered(None, bad, n, p_worse, p_better,
                         f"{bad} of {n} resamples have a non-positive gap (an undefined ratio), more than the "
                         f"{100 * (1 - LEVEL) / 2:g}% the CI's tail can absorb")
    # the (at most tail-mass many) resamples without a ratio sit in the CI's tails as ±inf: see stats.ratio_ci
    value = float(numer.mean() / denom.mean())
    return Recovered(Interval(value, ci.lo, ci.hi), bad, n, p_worse, p_better)


def recovery_table(res: EvalResults, names: list[str], worse: str = "zero_latents",
                   better: str = "transcoder") -> dict[str, Recovery]:
    """condition → its :class:`Recovery` of the gap ``worse − better``."""
    return {name: Recovery(recovered(res, name, "ce", worse, better), recovered(res, name, "kl", worse, better))
            for name in names}


def undefined_note(r: Recovered) -> str:
    """``"3 of 1000 bootstrap resamples had an undefined ratio"`` when any did (else empty)."""
    if not r.nonpositive_denominators:
        return ""
    return f"{r.nonpositive_denominators} of {r.n_resamples} bootstrap resamples had an undefined ratio"


def describe(r: Recovered, percent: bool = True) -> str:
    """``"62% [55%, 70%]"`` (noting resamples with an undefined ratio, if any), or "undefined" and why, in words."""
    if r.fraction is None:
        for why in ("not significant", "negative"):
            if f" {why}:" in r.reason:
                return f"an undefined share (gap {why})"
        return f"an undefined share ({r.reason})"
    f = r.fraction
    note = f" ({undefined_note(r)})" if r.nonpositive_denominators else ""
    if percent:
        return f"{_pct(f.value)} [{_pct(f.lo)}, {_pct(f.hi)}]{note}"
    return f"{f.value:.3f} [{f.lo:.3f}, {f.hi:.3f}]{note}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else ("+∞" if x > 0 else "−∞" if x < 0 else "n/a")


def format_p(p: float) -> str:
    if math.isnan(p):
        return "p = n/a"
    return "p < 0.001" if p < 1e-3 else f"p = {p:.3f}"
