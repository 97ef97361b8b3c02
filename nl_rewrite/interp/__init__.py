"""Interpretation: explaining latents with an LLM (:mod:`.explain`) or from token statistics (:mod:`.lexical`; pair
items under a global character budget in :mod:`.detailed`), detection
scoring of explanations (:mod:`.score`), simulating a latent's activations from its explanation (:mod:`.simulate`,
with simulations stored once per latent and window in :mod:`.simulation_store`), calibrating simulated scores onto
activation values (:mod:`.calibrate`) and choosing which latents to simulate (:mod:`.selection`).
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.interp.explain": ("ExplainConfig", "Explanation", "ExplanationParseError", "explain_latents",
                                  "load_explanations"),
    "nl_rewrite.interp.score": ("ScoreConfig", "DetectionScore", "score_explanations", "rank_latents", "load_scores"),
    "nl_rewrite.interp.simulate": ("Simulator", "SimulationItem", "SimulatorStats"),
    "nl_rewrite.interp.lexical": ("LexicalSimulator", "lexical_explanations", "candidate_items", "LexicalItem",
                                  "ParsedExplanation"),
    "nl_rewrite.interp.detailed": ("detailed_explanations",),
    "nl_rewrite.interp.calibrate": ("Calibrator", "LinearCalibrator", "QuantileCalibrator", "IsotonicCalibrator",
                                    "make_calibrator", "calibrator_from_dict", "count_fallbacks", "CALIBRATIONS"),
    "nl_rewrite.interp.simulation_store": ("SimulationStore", "simulate_into_store", "SimulationQuality",
                                           "simulation_quality"),
    "nl_rewrite.interp.selection": ("choose_latents", "usable_pool", "ORDERS"),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
