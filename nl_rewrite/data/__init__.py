"""Text data: the embedded corpora (State of the Union speeches; BBC News for the out-of-distribution split),
their document-level ``train``/``explain``/``eval``/``eval_ood`` splits, and fixed-length token windows that never
cross documents (:func:`token_windows` → :class:`TokenWindows`), the unit every later stage resamples and caches.
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.data.windows": ("token_windows", "TokenWindows", "Document", "load_splits", "split_manifest",
                                "sotu_documents", "bbc_documents", "SPLITS"),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
