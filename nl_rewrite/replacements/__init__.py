"""Replacement modules that attach to hook sites. Coder and simulator replacements live in submodules."""

from nl_rewrite.replacements.base import BatchInfo, Replacement
from nl_rewrite.replacements.baselines import IdentityReplacement, MeanReplacement, ZeroReplacement

__all__ = ["BatchInfo", "Replacement", "IdentityReplacement", "MeanReplacement", "ZeroReplacement"]
