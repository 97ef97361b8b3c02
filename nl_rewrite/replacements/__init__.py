"""Replacement modules that attach to hook sites. Coder and simulator replacements live in submodules."""

from .base import BatchInfo, Replacement
from .baselines import IdentityReplacement, MeanReplacement, ZeroReplacement

__all__ = ["BatchInfo", "Replacement", "IdentityReplacement", "MeanReplacement", "ZeroReplacement"]
