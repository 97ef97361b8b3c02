"""Replacements: modules that compute the activation at one hook site (``write_site``) from another (``read_site``) and
attach to the model for a forward pass (:class:`Replacement`). Shipped: the baselines (zero, mean, identity), the
coder-based ones (transcoder, SAE, zero- and random-latents), the oracle ladder, the NL-simulator replacement over
stored simulations and the live one that simulates on any text.
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.replacements.base": ("Replacement", "BatchInfo", "replacement_names"),
    "nl_rewrite.replacements.baselines": ("ZeroReplacement", "IdentityReplacement", "MeanReplacement"),
    "nl_rewrite.replacements.coders": ("CoderReplacement", "TranscoderReplacement", "SAEReplacement",
                                       "ZeroLatentsReplacement", "RandomLatentsReplacement"),
    "nl_rewrite.replacements.oracles": ("OracleReplacement",),
    "nl_rewrite.replacements.simulated": ("NLSimulatorReplacement",),
    "nl_rewrite.replacements.live": ("LiveSimulatorReplacement",),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
