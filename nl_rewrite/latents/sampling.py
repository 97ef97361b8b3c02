"""Which windows to show for a latent: activating examples for the explainer, held-out ones for scoring, negatives.

Protocol (the paper's, via delphi): a latent's activating windows are ranked by their peak activation and cut
into ``n_bins`` equal-count quantile bins. From each bin, ``n_train / n_bins`` windows go to the explainer and
``n_heldout / n_bins`` other windows are held out for detection scoring. Negatives are random windows where the
latent never fires. Everything is drawn from a generator seeded by ``(seed, latent)``, so the same config gives
the same split in the explainer and the scorer, and the two never share a window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from nl_rewrite.errors import NLRewriteError
from nl_rewrite.latents.cache import LatentCache

TrainSource = Literal["quantiles", "top"]
TRAIN_SOURCES: tuple[str, ...] = get_args(TrainSource)


class SamplingError(NLRewriteError):
    """A latent with too few activating windows to sample from."""


@dataclass(frozen=True)
class Example:
    """One window with the latent's activation at every position."""

    window_id: int
    tokens: list[int]
    acts: list[float]

    @property
    def max_act(self) -> float:
        return max(self.acts)

    def to_dict(self) -> dict:
        return {"window_id": self.window_id, "tokens": self.tokens, "acts": self.acts}

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(int(d["window_id"]), [int(t) for t in d["tokens"]], [float(a) for a in d["acts"]])


@dataclass
class LatentExamples:
    latent: int
    train: list[Example]
    """Shown to the explainer."""
    heldout: list[Example]
    """Activating windows kept for scoring; disjoint from ``train``."""
    negatives: list[Example]
    """Windows where the latent is zero everywhere."""


@dataclass(frozen=True)
class SamplingConfig:
    """Which windows a latent's explainer sees and its scorer is tested on."""

    n_train: int = 40
    """activating windows shown to the explainer (paper: 40)"""
    n_heldout: int = 20
    """activating windows held out for detection scoring"""
    n_negatives: int = 20
    """random non-activating windows (scoring; contrastive prompts)"""
    n_bins: int = 10
    """equal-count quantile bins of peak activation (paper: 10)"""
    train_source: TrainSource = "quantiles"
    """quantiles: train examples spread over the bins (paper); top: the highest-activating windows"""
    min_activating: int = 2
    """a latent needs at least this many activating windows"""
    seed: int = 0
    """sampling seed (combined with the latent id)"""

    def __post_init__(self) -> None:
        for name in ("n_train", "n_bins", "min_activating"):
            if getattr(self, name) < 1:
                raise ValueError(f"SamplingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heldout < 0 or self.n_negatives < 0:
            raise ValueError("SamplingConfig.n_heldout and n_negatives must be >= 0")
        if self.train_source not in TRAIN_SOURCES:
            raise ValueError(f"SamplingConfig.train_source must be one of {TRAIN_SOURCES}, got {self.train_source!r}")


def window_peaks(cache: LatentCache, latent: int) -> tuple[np.ndarray, dict[int, list[tuple[int, float]]]]:
    """Activating window ids sorted by peak activation (descending), and each window's (position, value) list."""
    windows, positions, values = cache.activations(latent)
    per_window: dict[int, list[tuple[int, float]]] = {}
    for w, p, v in zip(windows.tolist(), positions.tolist(), values.tolist()):
        per_window.setdefault(w, []).append((p, v))
    ids = np.array(sorted(per_window, key=lambda w: (-max(v for _, v in per_window[w]), w)), dtype=np.int64)
    return ids, per_window


def make_example(cache: LatentCache, window_id: int, hits: list[tuple[int, float]]) -> Example:
    acts = [0.0] * cache.meta.window
    for position, value in hits:
        acts[position] = float(value)
    return Example(int(window_id), cache.window_tokens(int(window_id)), acts)


def quantile_bins(ranked: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Equal-count bins of windows ranked by peak (bin 0 holds the strongest); fewer bins if fewer windows."""
    return [b for b in np.array_split(ranked, min(n_bins, len(ranked))) if len(b)]


def _per_bin(total: int, n_bins: int) -> list[int]:
    """Spread ``total`` over bins as evenly as possible (earlier bins take the remainder)."""
    return [total // n_bins + (i < total % n_bins) for i in range(n_bins)]


def _split_counts(available: int, cfg: SamplingConfig) -> tuple[int, int]:
    """How many train and held-out windows to take; short latents are split in proportion."""
    want = cfg.n_train + cfg.n_heldout
    if available >= want:
        return cfg.n_train, cfg.n_heldout
    n_heldout = int(available * cfg.n_heldout / want)
    return available - n_heldout, n_heldout


def _draw_from_bins(bins: list[np.ndarray], counts: list[int], rng: np.random.Generator,
                    exclude: set[int]) -> list[int]:
    picked: list[int] = []
    for b, n in zip(bins, counts):
        pool = np.array([w for w in b if int(w) not in exclude], dtype=np.int64)
        picked += [int(w) for w in rng.choice(pool, size=min(n, len(pool)), replace=False)]
    return picked


def _fill_short_bins(ranked: np.ndarray, picked: list[int], want: int, rng: np.random.Generator,
                     exclude: set[int]) -> list[int]:
    """Top up from any unused window when some bins were too small for their share."""
    taken = set(picked) | exclude
    rest = np.array([w for w in ranked if int(w) not in taken], dtype=np.int64)
    extra = rng.choice(rest, size=min(want - len(picked), len(rest)), replace=False) if want > len(picked) else []
    return picked + [int(w) for w in extra]


def _choose(ranked: np.ndarray, n: int, cfg: SamplingConfig, rng: np.random.Generator, exclude: set[int],
            top: bool) -> list[int]:
    if top:
        return [int(w) for w in ranked if int(w) not in exclude][:n]
    bins = quantile_bins(ranked, cfg.n_bins)
    picked = _draw_from_bins(bins, _per_bin(n, len(bins)), rng, exclude)
    return _fill_short_bins(ranked, picked, n, rng, exclude)


def sample_negatives(cache: LatentCache, active: set[int], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` random windows (without replacement) where the latent never fires."""
    candidates = np.array([w for w in range(len(cache)) if w not in active], dtype=np.int64)
    return sorted(int(w) for w in rng.choice(candidates, size=min(n, len(candidates)), replace=False))


def sample_latent(cache: LatentCache, latent: int, cfg: SamplingConfig) -> LatentExamples:
    """Train / held-out / negative examples for one latent (see the module docstring)."""
    ranked, hits = window_peaks(cache, latent)
    if len(ranked) < cfg.min_activating:
        raise SamplingError(f"latent {latent} fires in {len(ranked)} windows; need at least {cfg.min_activating}")
    rng = np.random.default_rng([cfg.seed, latent])
    n_train, n_heldout = _split_counts(len(ranked), cfg)
    train = _choose(ranked, n_train, cfg, rng, set(), top=cfg.train_source == "top")
    heldout = _choose(ranked, n_heldout, cfg, rng, set(train), top=False)
    negatives = sample_negatives(cache, set(hits), cfg.n_negatives, rng)
    order = {int(w): i for i, w in enumerate(ranked)}  # present examples strongest first
    return LatentExamples(
        latent,
        [make_example(cache, w, hits[w]) for w in sorted(train, key=order.__getitem__)],
        [make_example(cache, w, hits[w]) for w in sorted(heldout, key=order.__getitem__)],
        [make_example(cache, w, []) for w in negatives],
    )


def top_examples(cache: LatentCache, latent: int, n: int) -> list[Example]:
    """The ``n`` windows with the highest peak activation, strongest first."""
    ranked, hits = window_peaks(cache, latent)
    return [make_example(cache, int(w), hits[int(w)]) for w in ranked[:n]]


def select_latents(cache: LatentCache, n: int, how: str = "frequent", seed: int = 0,
                   min_count: int = 2) -> list[int]:
    """Pick ``n`` alive latents: the most frequent ones, or a seeded random sample of those alive."""
    count = cache.stats.count
    alive = torch.nonzero(count >= min_count).flatten()
    if how == "frequent":
        order = alive[torch.argsort(count[alive], descending=True, stable=True)]
        return order[:n].tolist()
    if how == "random":
        rng = np.random.default_rng(seed)
        return sorted(int(x) for x in rng.choice(alive.numpy(), size=min(n, len(alive)), replace=False))
    raise ValueError(f"unknown latent selection {how!r}; use 'frequent' or 'random'")
