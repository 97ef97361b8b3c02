"""Where sharded stages run: in this process (:class:`InProcess`) or on a Ray cluster (:class:`RayRunner`).

The latent cache (shards of windows), explanation, detection scoring and simulation (shards of latents) and the
Evaluator (shards of windows) take a ``runner``; ``--ray [ADDRESS]`` on the CLI picks :class:`RayRunner`.
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.parallel.runner": ("ShardRunner", "InProcess", "RayRunner", "RayOptions", "RayUnavailableError",
                                   "make_runner"),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
