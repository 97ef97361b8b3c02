"""make_backend: spec strings to backends, the cache wrapper, and clear errors for bad specs."""

from __future__ import annotations

import pytest

from nl_rewrite.errors import LLMError
from nl_rewrite.llm import CachedBackend, LLMBackend, make_backend
from nl_rewrite.llm.openai_backend import OpenAIBackend


def test_openai_spec_with_model_and_url(tmp_path):
    backend = make_backend("openai:my-model@http://127.0.0.1:9999/v1", cache=tmp_path / "c.sqlite", concurrency=3)
    assert isinstance(backend, CachedBackend) and isinstance(backend, LLMBackend)
    inner = backend.inner
    assert isinstance(inner, OpenAIBackend)
    assert (inner.model, inner.base_url) == ("my-model", "http://127.0.0.1:9999/v1")
    assert inner.calls.settings.concurrency == 3
    assert backend.backend_id == "openai:my-model"  # the URLs are not part of the cache key (replicas)


def test_openai_spec_falls_back_to_environment(monkeypatch):
    monkeypatch.setenv("NL_REWRITE_MODEL", "env-model")
    monkeypatch.setenv("NL_REWRITE_BASE_URL", "http://10.0.0.1:8000/v1")
    backend = make_backend("openai")
    assert (backend.model, backend.base_url) == ("env-model", "http://10.0.0.1:8000/v1")
    assert make_backend("openai:@http://h:1/v1").base_url == "http://h:1/v1"


def test_embedded_spec(tmp_cache, monkeypatch):
    from nl_rewrite.llm import embedded

    backend = make_backend("embedded:tiny-smollm2", reuse_prefix=False)
    assert backend.backend_id == "embedded:tiny-smollm2" and backend.reuse_prefix is False
    built = []
    monkeypatch.setattr(embedded.EmbeddedBackend, "__init__",
                        lambda self, model, **kw: built.append(model) or setattr(self, "backend_id", "x"))
    make_backend("embedded")
    assert built == ["smollm2-135m"], "a bare 'embedded' is the embedded SmolLM2"


def test_unknown_spec_is_named():
    with pytest.raises(LLMError, match="unknown backend 'llamafile'"):
        make_backend("llamafile")
