"""nl_rewrite: partially rewrite a transformer in natural language, and measure what it costs."""

from nl_rewrite.model.loading import load_model, tiny_model
from nl_rewrite.model.sites import Site

__all__ = ["load_model", "tiny_model", "Site"]
