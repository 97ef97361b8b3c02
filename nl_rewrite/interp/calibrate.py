"""Calibrators: map a latent's simulated scores (expected digit in [0, 9]) onto activation values.

Fitted per latent on the ``explain`` split, never on ``eval``. Three kinds:

- ``linear`` (the paper): ``E / 9 * max_activation``.
- ``quantile`` (quantile normalisation): a score's rank within the latent's simulated-score
  distribution is mapped onto the latent's real activation distribution *including its firing
  rate*: the top ``rate`` fraction of scores fire, with values read by quantile from the real
  nonzero activations; the rest map to 0. The simulated latent then fires as often as the real one.
- ``isotonic``: isotonic (pool-adjacent-violators) regression of true activation on simulated
  score, via ``scipy.optimize.isotonic_regression``; monotone non-decreasing, linear between
  knots, flat beyond them.

A latent never seen firing cannot be calibrated: its calibrator is a *fallback* that maps every
score to 0, records why in ``fallback`` and logs it; ``count_fallbacks`` tallies them for reports.
NaN scores (the simulator got no usable logprobs) stay NaN: the consumer decides and counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Literal, Protocol, get_args, runtime_checkable

import numpy as np
import torch
from einops import rearrange, repeat
from jaxtyping import Float
from scipy.optimize import isotonic_regression
from torch import Tensor

log = logging.getLogger(__name__)

MAX_DIGIT = 9.0
Calibration = Literal["linear", "quantile", "isotonic"]
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
_MAX_KNOTS = 1024
"""Quantile tables are thinned to this many points so one latent's JSON stays a few kB."""


@runtime_checkable
class Calibrator(Protocol):
    kind: ClassVar[str]
    fallback: str | None

    def fit(self, sim_scores: Float[Tensor, " n"], true_acts: Float[Tensor, " n"]) -> "Calibrator": ...

    def __call__(self, scores: Float[Tensor, " n"]) -> Float[Tensor, " n"]: ...

    def to_dict(self) -> dict[str, Any]: ...


def _as_numpy(values: Tensor | np.ndarray | Iterable[float]) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().to(torch.float64).cpu().numpy().reshape(-1)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _finite_pairs(sim_scores, true_acts) -> tuple[np.ndarray, np.ndarray]:
    """Paired arrays without NaN scores (those carry no information to fit on)."""
    scores, acts = _as_numpy(sim_scores), _as_numpy(true_acts)
    if scores.shape != acts.shape:
        raise ValueError(f"sim_scores ({scores.shape[0]}) and true_acts ({acts.shape[0]}) must pair up")
    keep = np.isfinite(scores) & np.isfinite(acts)
    return scores[keep], acts[keep]


def _apply(scores: Tensor, fn) -> Tensor:
    """Run a numpy map on finite scores; NaN in → NaN out; zeros for a fallback calibrator."""
    flat = _as_numpy(scores)
    out = np.full_like(flat, np.nan)
    finite = np.isfinite(flat)
    out[finite] = fn(flat[finite])
    return torch.from_numpy(out).to(torch.float32).reshape(scores.shape)


def _thin(sorted_values: np.ndarray, n: int = _MAX_KNOTS) -> np.ndarray:
    """Evenly spaced quantiles of a sorted sample (the sample itself when it is short)."""
    if sorted_values.size <= n:
        return sorted_values
    return np.quantile(sorted_values, np.linspace(0.0, 1.0, n))


def _fallback_note(latent: int | None, why: str) -> str:
    # per latent at debug level: callers count fallbacks (count_fallbacks) and log one summary line
    log.debug("latent %s cannot be calibrated (%s); its simulated values map to 0", latent, why)
    return why


@dataclass
class _LatentCalibrator:
    """What every kind records besides its fitted values: the latent (for logs) and, when it could not be fitted,
    why (``fallback``); and the dict round trip, ``to_dict`` and its inverse ``Cls.from_dict(d)``, which checks
    that ``d`` is of this kind."""

    # keyword-only: each kind's own fitted values stay its first positional fields, as before this base existed
    latent: int | None = field(default=None, kw_only=True)
    fallback: str | None = field(default=None, kw_only=True)
    kind: ClassVar[str]

    def fitted_values(self) -> dict[str, Any]:
        """The kind's own fitted values, JSON-safe (what ``to_dict`` adds to the kind, latent and fallback)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "latent": self.latent, "fallback": self.fallback, **self.fitted_values()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        fields = {k: v for k, v in data.items() if k != "kind"}
        if data.get("kind", cls.kind) != cls.kind:
            raise ValueError(f"{cls.__name__}.from_dict got a {data.get('kind')!r} calibrator")
        return cls(**fields)


@dataclass
class LinearCalibrator(_LatentCalibrator):
    """The paper's mapping: ``E / 9 * max_activation`` (max over the explain split)."""

    max_activation: float = 0.0
    kind: ClassVar[str] = "linear"

    def fit(self, sim_scores, true_acts) -> "LinearCalibrator":
        _, acts = _finite_pairs(sim_scores, true_acts)
        return self.fit_max(float(acts.max()) if acts.size else 0.0)

    def fit_max(self, max_activation: float) -> "LinearCalibrator":
        """Fit from the latent's max cached activation alone (what the paper used)."""
        self.max_activation = max(float(max_activation), 0.0)
        self.fallback = None if self.max_activation > 0 else _fallback_note(self.latent, "never fires")
        return self

    def __call__(self, scores: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
        scale = self.max_activation / MAX_DIGIT if self.fallback is None else 0.0
        return _apply(scores, lambda s: np.clip(s, 0.0, MAX_DIGIT) * scale)

    def fitted_values(self) -> dict[str, Any]:
        return {"max_activation": self.max_activation}


@dataclass
class QuantileCalibrator(_LatentCalibrator):
    """Rank within the simulated scores → real activation quantile, reproducing the firing rate."""

    sim_reference: list[float] = field(default_factory=list)
    """Sorted (thinned) simulated scores on the explain split: the rank reference."""
    act_quantiles: list[float] = field(default_factory=list)
    """Real nonzero activations at evenly spaced quantiles 0..1."""
    firing_rate: float = 0.0
    kind: ClassVar[str] = "quantile"

    def fit(self, sim_scores, true_acts) -> "QuantileCalibrator":
        """Fit from paired explain-split data: the firing rate and nonzero values come from ``true_acts``."""
        scores, acts = _finite_pairs(sim_scores, true_acts)
        rate = float((acts > 0).mean()) if acts.size else 0.0
        return self.fit_distribution(scores, acts[acts > 0], rate)

    def fit_distribution(self, sim_scores, nonzero_sample, firing_rate: float) -> "QuantileCalibrator":
        """Fit from any simulated scores plus the latent's activation distribution (e.g. LatentCache stats)."""
        if not 0.0 <= firing_rate <= 1.0:
            raise ValueError(f"firing_rate must be in [0, 1], got {firing_rate}")
        scores = _as_numpy(sim_scores)
        scores = np.sort(scores[np.isfinite(scores)])
        nonzero = np.sort(_as_numpy(nonzero_sample))
        nonzero = nonzero[np.isfinite(nonzero) & (nonzero > 0)]
        self.sim_reference = _thin(scores).tolist()
        self.act_quantiles = _thin(nonzero).tolist()
        self.firing_rate = float(firing_rate)
        self.fallback = self._why_unfittable()
        if self.fallback:
            _fallback_note(self.latent, self.fallback)
        return self

    def _why_unfittable(self) -> str | None:
        if self.firing_rate <= 0 or not self.act_quantiles:
            return "never fires"
        if not self.sim_reference:
            return "no finite simulated scores to rank against"
        return None

    def ranks(self, scores: np.ndarray) -> np.ndarray:
        """Mid-rank of each score in the reference, in (0, 1): ties share the middle of their run."""
        ref = np.asarray(self.sim_reference)
        below = np.searchsorted(ref, scores, side="left")
        upto = np.searchsorted(ref, scores, side="right")
        return (below + upto) / (2.0 * ref.size)

    def _map(self, scores: np.ndarray) -> np.ndarray:
        if self.fallback:
            return np.zeros_like(scores)
        ranks = self.ranks(scores)
        threshold = 1.0 - self.firing_rate
        # Within the firing tail, the rank's position (0..1] picks the activation quantile.
        tail = np.clip((ranks - threshold) / self.firing_rate, 0.0, 1.0)
        acts = np.asarray(self.act_quantiles)
        values = np.interp(tail, np.linspace(0.0, 1.0, acts.size), acts) if acts.size > 1 else np.full_like(tail, acts[0])
        return np.where(ranks > threshold, values, 0.0)

    def __call__(self, scores: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
        return _apply(scores, self._map)

    def fitted_values(self) -> dict[str, Any]:
        return {"firing_rate": self.firing_rate, "sim_reference": self.sim_reference,
                "act_quantiles": self.act_quantiles}


@dataclass
class IsotonicCalibrator(_LatentCalibrator):
    """Isotonic (monotone non-decreasing) regression of true activation on simulated score."""

    knots_x: list[float] = field(default_factory=list)
    knots_y: list[float] = field(default_factory=list)
    kind: ClassVar[str] = "isotonic"

    def fit(self, sim_scores, true_acts) -> "IsotonicCalibrator":
        scores, acts = _finite_pairs(sim_scores, true_acts)
        if not (acts > 0).any():
            self.knots_x, self.knots_y = [], []
            self.fallback = _fallback_note(self.latent, "never fires on the pairs it was fitted on")
            return self
        unique_x, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
        # Equal scores must get one value: pool them into their mean, weighted by their count.
        y_mean = np.bincount(inverse, weights=acts) / counts
        fit = isotonic_regression(y_mean, weights=counts.astype(np.float64), increasing=True)
        starts, ends = fit.blocks[:-1], fit.blocks[1:]  # block b is unique_x[starts[b]:ends[b]]
        values = fit.x[starts]
        # A block is flat, so its first and last x carry the whole function under interpolation.
        xs = rearrange([unique_x[starts], unique_x[ends - 1]], "end block -> (block end)")
        ys = repeat(values, "block -> (block end)", end=2)
        self.knots_x, self.knots_y, self.fallback = xs.tolist(), ys.tolist(), None
        return self

    def __call__(self, scores: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
        if self.fallback:
            return _apply(scores, np.zeros_like)
        return _apply(scores, lambda s: np.interp(s, self.knots_x, self.knots_y))

    def fitted_values(self) -> dict[str, Any]:
        return {"knots_x": self.knots_x, "knots_y": self.knots_y}


@dataclass
class Uncalibrated(_LatentCalibrator):
    """Scores that are activations already (a lookup of mean activations, an oracle's values): passed through.
    Not a run option; reference arms that predict activations use it."""

    kind: ClassVar[str] = "none"

    def fit(self, sim_scores, true_acts) -> "Uncalibrated":
        return self

    def __call__(self, scores: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
        return scores.to(torch.float32)

    def fitted_values(self) -> dict[str, Any]:
        return {}


_KINDS: dict[str, type] = {c.kind: c for c in (LinearCalibrator, QuantileCalibrator, IsotonicCalibrator)}


def make_calibrator(kind: str, latent: int | None = None) -> Calibrator:
    """An unfitted calibrator of ``kind`` (one of ``CALIBRATIONS``)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown calibration {kind!r}; valid: {', '.join(CALIBRATIONS)}")
    return _KINDS[kind](latent=latent)


def calibrator_from_dict(data: dict[str, Any]) -> Calibrator:
    """Inverse of ``to_dict`` (JSON-safe dicts)."""
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"calibrator dict has unknown kind {kind!r}; valid: {', '.join(CALIBRATIONS)}")
    return _KINDS[kind].from_dict(data)


def count_fallbacks(calibrators: Iterable[Calibrator]) -> dict[str, int]:
    """How many calibrators fell back, by reason (for logs and reports)."""
    counts: dict[str, int] = {}
    for cal in calibrators:
        if cal.fallback:
            counts[cal.fallback] = counts.get(cal.fallback, 0) + 1
    return counts
