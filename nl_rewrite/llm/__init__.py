"""The LLM layer: one protocol (:mod:`.base`), an in-process torch backend, an OpenAI-compatible HTTP backend,
an on-disk call cache, a spec-string factory and an OpenAI-schema server for the embedded model.

Backends are imported lazily by :func:`make_backend`, so ``import nl_rewrite.llm`` stays cheap.
"""

from .base import ChatRequest, LLMBackend, ScoreRequest
from .cache import CachedBackend
from .factory import make_backend

__all__ = ["ChatRequest", "ScoreRequest", "LLMBackend", "CachedBackend", "make_backend"]
