"""The LLM layer: one protocol (:mod:`.base`), an in-process torch backend, an OpenAI-compatible HTTP backend,
an on-disk call cache, a spec-string factory and an OpenAI-schema server for the embedded model.

Backends are imported lazily by :func:`make_backend`, so ``import nl_rewrite.llm`` stays cheap.
"""

from nl_rewrite.llm.base import ChatRequest, LLMBackend, ScoreRequest
from nl_rewrite.llm.cache import CachedBackend
from nl_rewrite.llm.factory import make_backend

__all__ = ["ChatRequest", "ScoreRequest", "LLMBackend", "CachedBackend", "make_backend"]
