"""The LLM layer: one protocol (:mod:`.base`: :class:`LLMBackend`, :class:`ChatRequest`, :class:`ScoreRequest`), an
in-process torch backend (:class:`EmbeddedBackend`), HTTP backends for OpenAI-compatible servers
(:class:`OpenAIBackend`) and SGLang (:class:`SGLangBackend`), an on-disk call cache (:class:`CachedBackend`), a
spec-string factory (:func:`make_backend`), an OpenAI-schema server for the embedded model (:func:`make_server`) and a
llama.cpp launcher (:func:`llamacpp_server`).

Every name loads lazily, and :func:`make_backend` imports only the backend it builds, so ``import nl_rewrite.llm``
stays cheap.
"""

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.llm.base": ("LLMBackend", "ChatRequest", "ScoreRequest"),
    "nl_rewrite.llm.cache": ("CachedBackend",),
    "nl_rewrite.llm.factory": ("make_backend",),
    "nl_rewrite.llm.embedded": ("EmbeddedBackend",),
    "nl_rewrite.llm.openai_backend": ("OpenAIBackend",),
    "nl_rewrite.llm.sglang_backend": ("SGLangBackend",),
    "nl_rewrite.llm.server": ("make_server",),
    "nl_rewrite.llm.llamacpp": ("llamacpp_server",),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
