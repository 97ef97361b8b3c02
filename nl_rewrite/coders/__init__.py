"""Sparse coders: the TopK :class:`SparseCoder` (a transcoder ``mlp_in.L`` → ``mlp_out.L`` or an SAE on one site) with
its :class:`CoderConfig`, checkpoints on disk in EleutherAI sparsify's format (SAELens TopK folders load too) through
:func:`load_coder` / :func:`save_coder`, and CPU training streamed from the model (:mod:`.train`).
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.coders.sparse_coder": ("SparseCoder", "CoderConfig", "SparseLatents", "KINDS"),
    "nl_rewrite.coders.checkpoint": ("load_coder", "save_coder", "is_checkpoint", "CheckpointShapeError"),
    "nl_rewrite.coders.train": ("TrainConfig", "default_transcoder", "site_activations"),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
