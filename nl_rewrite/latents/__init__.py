"""A coder's latents over a set of windows: the sparse on-disk :class:`LatentCache` (activations, per-latent statistics,
an index by latent) and the sampling of windows to show for a latent (:mod:`.sampling`: activating examples for the
explainer, held-out and negative windows for scoring).
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.latents.cache": ("LatentCache", "LatentStats", "LatentCacheError", "CacheMeta", "coder_fingerprint"),
    "nl_rewrite.latents.sampling": ("SamplingConfig", "SamplingError", "Example", "LatentExamples", "sample_latent",
                                    "select_latents", "top_examples"),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
