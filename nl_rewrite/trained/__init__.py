"""The trained single-pass simulator: a truncated small LM with a head (:mod:`.net`) reads an explanation and a
window once and predicts every token's activation; it is trained on the explain split with held-out latents and
documents (:mod:`.data`, :mod:`.training`) and simulates like the prompted simulators (:mod:`.simulator`).
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.trained.net": ("NetConfig", "SimulatorNet", "InputEncoder"),
    "nl_rewrite.trained.data": ("DataConfig", "LeakError", "build_data"),
    "nl_rewrite.trained.training": ("TrainSimulatorConfig", "TrainingInterrupted", "train_simulator",
                                    "load_simulator"),
    "nl_rewrite.trained.simulator": ("TrainedSimulator",),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
