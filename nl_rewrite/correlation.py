"""Pearson correlation, defined once for the package: per column of two tables, or of two series."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor


def column_pearson(a: Float[Tensor, "n m"], b: Float[Tensor, "n m"]) -> Float[Tensor, " m"]:
    """Pearson r of each column of ``a`` with the same column of ``b`` (float64); NaN where either is constant."""
    a, b = a.double(), b.double()
    a, b = a - a.mean(0), b - b.mean(0)
    scale = (a.pow(2).sum(0) * b.pow(2).sum(0)).sqrt()
    return torch.where(scale > 0, (a * b).sum(0) / scale, torch.full_like(scale, math.nan))


def pearson(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Pearson r of two series; NaN when either is constant or shorter than 2 (a correlation is undefined)."""
    if a.numel() < 2:
        return math.nan
    return float(column_pearson(a.reshape(-1, 1), b.reshape(-1, 1))[0])
