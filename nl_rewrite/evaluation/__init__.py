"""Measuring a replacement: the :class:`Evaluator` (CE and KL(clean‖patched) per window, against the clean model, with
window-bootstrap CIs in :class:`EvalResults`), the statistics behind it (:mod:`.stats`), recovered fractions of a
gap with their undefined cases (:mod:`.recovery`), CE and KL from the last hidden state (:mod:`.scoring`), the
per-layer ablation sweep, side-by-side generation, and the clean-prefix reuse that makes patched runs cheaper.
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.evaluation.evaluator": ("Evaluator", "EvalResults", "ConditionSummary"),
    "nl_rewrite.evaluation.recovery": ("recovered", "recovery_table", "gap", "describe", "Recovered", "Interval"),
    "nl_rewrite.evaluation.stats": ("bootstrap_indices", "mean_ci", "ratio_ci", "RatioCI", "paired_wilcoxon"),
    "nl_rewrite.evaluation.layer_sweep": ("sweep_layers", "choose_layer", "LayerRow"),
    "nl_rewrite.evaluation.generate": ("greedy", "greedy_batch", "greedy_continuations", "side_by_side"),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
