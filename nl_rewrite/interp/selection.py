"""Which latents to simulate: the usable pool (latents with an explanation) and the first fraction of it, in a
chosen order (best explained first, best simulated first, or seeded random)."""

from __future__ import annotations

import logging
import math
import random
from typing import Iterable, Literal, Mapping, Sequence, get_args

log = logging.getLogger(__name__)

Order = Literal["explanation_score", "simulation_score", "random"]
ORDERS: tuple[str, ...] = get_args(Order)


def usable_pool(explanations: Iterable) -> tuple[list[int], int]:
    """Latent ids whose explanation is usable (``ok`` and non-empty text), and how many were excluded.

    Accepts records with ``latent``, ``ok`` and ``text`` attributes (``explain.Explanation``)."""
    pool, excluded = [], 0
    for record in explanations:
        if getattr(record, "ok", False) and (getattr(record, "text", "") or "").strip():
            pool.append(int(record.latent))
        else:
            excluded += 1
    if excluded:
        log.warning("%d latent(s) without a usable explanation are excluded from simulation", excluded)
    return pool, excluded


def choose_latents(fraction: float, order: str, scores: Mapping[int, float] | None = None, seed: int = 0,
                   pool: Sequence[int] | None = None) -> list[int]:
    """The first ``fraction`` of ``pool`` (default: the scored latents), best first.

    ``order``: ``explanation_score`` or ``simulation_score`` (highest ``scores`` first; latents of the
    pool without a finite score go last, counted and logged) or ``random`` (seeded). A fraction above 0
    chooses at least one latent, so tiny fractions of small pools are not silently empty."""
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if order not in ORDERS:
        raise ValueError(f"unknown latent order {order!r}; valid: {', '.join(ORDERS)}")
    if order != "random" and scores is None:
        raise ValueError(f"order {order!r} needs scores")
    candidates = sorted(int(x) for x in (pool if pool is not None else (scores or {})))
    if order == "random":
        ranked = candidates[:]
        random.Random(seed).shuffle(ranked)
    else:
        ranked = _by_score(candidates, scores or {}, order)
    n = 0 if fraction == 0 or not ranked else max(1, round(fraction * len(ranked)))
    return ranked[:n]


def _score_of(scores: Mapping[int, float], latent: int) -> float | None:
    value = scores.get(latent)
    return float(value) if value is not None and math.isfinite(value) else None


def _by_score(candidates: list[int], scores: Mapping[int, float], order: str) -> list[int]:
    def key(latent: int) -> tuple[bool, float, int]:
        value = _score_of(scores, latent)
        return (value is None, -value if value is not None else 0.0, latent)  # ties broken by id

    unscored = sum(1 for lat in candidates if _score_of(scores, lat) is None)
    if unscored:
        log.warning("%d of %d latents have no finite %s; they are ranked last", unscored, len(candidates), order)
    return sorted(candidates, key=key)
