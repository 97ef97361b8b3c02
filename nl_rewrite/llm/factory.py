"""Build a backend from a short spec string (the CLI's ``--backend``).

- ``embedded`` or ``embedded:<model>``: :class:`EmbeddedBackend` (default model ``smollm2-135m``)
- ``openai``: :class:`OpenAIBackend` from the environment (``NL_REWRITE_BASE_URL``, ``NL_REWRITE_MODEL``, ``OPENAI_API_KEY``)
- ``openai:<model>`` or ``openai:<model>@<base_url>`` (either part may be empty: ``openai:@http://localhost:8000/v1``)
- ``sglang:<model>@<server root>``: :class:`SGLangBackend` on SGLang's native ``/generate``

Several replicas of one model: comma-separated URLs, ``openai:<model>@http://h1:8000/v1,http://h2:8000/v1`` (load
balanced, a dead one taken out of rotation; see :mod:`.http_calls`).

Remote backends render prompts with the model's own chat template: from ``<model>`` when it is an embedded
name, a HF directory or a ``.gguf`` path, else from ``NL_REWRITE_CHAT_TEMPLATE`` or a ``chat_template`` option.

With ``cache`` given, the backend is wrapped in :class:`CachedBackend` on that sqlite file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nl_rewrite.placement import Placement
from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import LLMBackend
from nl_rewrite.llm.cache import CachedBackend

DEFAULT_EMBEDDED = "smollm2-135m"


KINDS = ("embedded", "openai", "sglang")


def check_spec(spec: str) -> None:
    """Fail on a spec that names no backend, before anything loads (the run checks it before its first stage)."""
    kind = spec.strip().partition(":")[0]
    if kind not in KINDS:
        raise LLMError(f"unknown backend {spec!r}: use 'embedded[:<model>]', 'openai[:<model>[@<base_url>]]' or "
                       "'sglang:<model>@<server root>'")


def make_backend(spec: str, cache: Path | str | None = None, placement: Placement = Placement(), **options: Any
                 ) -> LLMBackend:
    """The backend ``spec`` names; ``options`` go to its constructor (e.g. ``concurrency``, ``reuse_prefix``).
    ``placement`` is where an embedded model runs (a server's model runs where the server put it)."""
    check_spec(spec)
    kind, _, rest = spec.strip().partition(":")
    if kind == "embedded":
        from nl_rewrite.llm.embedded import EmbeddedBackend

        backend: LLMBackend = EmbeddedBackend(rest or DEFAULT_EMBEDDED, placement=placement, **options)
    elif kind == "openai":
        from nl_rewrite.llm.openai_backend import OpenAIBackend

        model, _, base_url = rest.partition("@")
        backend = OpenAIBackend(base_url=base_url or None, model=model or None, **options)
    elif kind == "sglang":
        from nl_rewrite.llm.sglang_backend import SGLangBackend

        model, _, base_url = rest.partition("@")
        backend = SGLangBackend(base_url=base_url or None, model=model or None, **options)
    else:
        raise AssertionError(kind)  # check_spec admits only KINDS
    return CachedBackend(backend, cache) if cache is not None else backend
