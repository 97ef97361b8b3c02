"""Pearson correlation, defined once for the package: per column of two tables, or of two series."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor


class ColumnPearson:
    """Pearson r of each column of a prediction with the same column of ``target``; the target is centred once, so
    scoring many predictions against one target (the noise bisection scores 18) costs one pass each."""

    def __init__(self, target: Float[Tensor, "n m"]):
        t = target.double()
        self.centred = t - t.mean(0)
        self.sum_sq = self.centred.pow(2).sum(0)

    def __call__(self, pred: Float[Tensor, "n m"]) -> Float[Tensor, " m"]:
        """NaN where either column is constant."""
        p = pred.double()
        p = p - p.mean(0)
        scale = (p.pow(2).sum(0) * self.sum_sq).sqrt()
        return torch.where(scale > 0, (p * self.centred).sum(0) / scale, torch.full_like(scale, math.nan))


def column_pearson(a: Float[Tensor, "n m"], b: Float[Tensor, "n m"]) -> Float[Tensor, " m"]:
    """Pearson r of each column of ``a`` with the same column of ``b`` (float64); NaN where either is constant."""
    return ColumnPearson(b)(a)


def pearson(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Pearson r of two series; NaN when either is constant or shorter than 2 (a correlation is undefined)."""
    if a.numel() < 2:
        return math.nan
    return float(column_pearson(a.reshape(-1, 1), b.reshape(-1, 1))[0])
