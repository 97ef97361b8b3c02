"""The whole experiment behind ``nl-rewrite run``: its configuration (:class:`RunConfig`), the resumable stages
(:func:`run_experiment` → :class:`Artifacts`), the lexical arms and oracle ladder, the named baseline conditions, and
the outputs (results.json/csv, plots, report.html, the answer in words).
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.pipeline.config": ("RunConfig",),
    "nl_rewrite.pipeline.experiment": ("run_experiment", "Artifacts"),
    "nl_rewrite.pipeline.report": ("write_outputs", "run_results"),
    "nl_rewrite.pipeline.results": ("RunResults", "load_results"),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
