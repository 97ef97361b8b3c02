"""nl_rewrite: partially rewrite a transformer in natural language, and measure what it costs."""

from .models import load_model, tiny_model
from .sites import Site

__all__ = ["load_model", "tiny_model", "Site"]
