"""A served model's own chat template and tokenizer, read locally, so a request's text never depends on the backend.

The embedded backend renders chats with its tokenizer's template. A remote backend (an OpenAI-compatible server,
SGLang) renders with the same template when it knows the model's tokenizer: the simulator's prompt is then the
same text whichever backend serves the model, and token-id scoring (vLLM ``prompt_logprobs``, SGLang) splits a
prompt at exactly the same tokens as the embedded backend.

A template source is, in order of preference:
- an embedded model name (``smollm2-135m``, ``gemma3-270m``);
- a local Hugging Face directory (``tokenizer_config.json`` with ``chat_template``);
- a ``.gguf`` file (its tokenizer and template are read from the GGUF metadata);
- a hub id (``org/name``) whose tokenizer is already in the local Hugging Face cache (nothing is downloaded).

llama.cpp's server names a model by the path it was started with, so a served GGUF resolves by itself.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest

TEMPLATE_ENV = "NL_REWRITE_CHAT_TEMPLATE"
HOW_TO_PASS = (f"pass chat_template=<embedded model name | HF directory | .gguf file> to the backend (Python), or "
               f"set {TEMPLATE_ENV} to one of those (command line)")


class ChatTemplate:
    """A tokenizer's chat template and encoder (``tokenizer`` is a transformers tokenizer)."""

    def __init__(self, tokenizer, source: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise LLMError(f"the tokenizer of {source!r} has no chat template; {HOW_TO_PASS}")
        self.tokenizer = tokenizer
        self.source = source

    def __repr__(self) -> str:
        return f"ChatTemplate(source={self.source!r})"

    def render(self, request: ChatRequest) -> str:
        """The templated prompt with the assistant turn opened and ``prefill`` appended."""
        return render_with(self.tokenizer, request)

    def encode_prefix(self, text: str) -> list[int]:
        """Prompt-start ids: the tokenizer's special start tokens (BOS where it adds one), then ``text``."""
        return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def encode_segment(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def choice_ids(self, choices: Sequence[str]) -> list[int]:
        """One token id per choice; an ``LLMError`` for a choice that is not exactly one token."""
        ids = [self.encode_segment(c) for c in choices]
        bad = [c for c, i in zip(choices, ids) if len(i) != 1]
        if bad:
            raise LLMError(f"choices {bad} are not single tokens for {self.source}; token-id scoring needs one "
                           "token per choice")
        return [i[0] for i in ids]


def render_with(tokenizer, request: ChatRequest) -> str:
    """``request`` through ``tokenizer``'s chat template, assistant turn opened, prefill appended."""
    messages = [{"role": role, "content": content} for role, content in request.messages]
    if not messages:
        raise LLMError("a chat request needs at least one message")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + request.prefill


def find_template(explicit: str | None, model: str | None) -> ChatTemplate | None:
    """The template named by ``explicit``, else by the environment, else by the served model's name when that
    names a local source; ``None`` when nothing names one (an explicit or environment source must load)."""
    named = explicit or os.environ.get(TEMPLATE_ENV)
    if named:
        return load_template(named)
    if model and _is_local_source(model):
        return load_template(model)
    if model and _looks_like_hub_id(model):
        try:  # vLLM and SGLang name a model by its hub id: its tokenizer may be in the local HF cache
            return load_template(model)
        except LLMError:
            return None
    return None


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()


def _is_local_source(name: str) -> bool:
    from nl_rewrite.model.loading import EMBEDDED, TINY_SMOLLM2

    path = Path(name)
    return name in EMBEDDED or name == TINY_SMOLLM2 or (path.suffix == ".gguf" and path.is_file()) or (path / "tokenizer_config.json").is_file()


@functools.lru_cache(maxsize=8)
def load_template(source: str) -> ChatTemplate:
    """The chat template of ``source`` (see the module docstring); an ``LLMError`` naming the fix if it fails."""
    from nl_rewrite.errors import ModelLoadError
    from nl_rewrite.model.loading import load_tokenizer

    try:
        return ChatTemplate(load_tokenizer(source), source)
    except ModelLoadError as exc:
        raise LLMError(f"could not read a chat template from {source!r}: {exc}; {HOW_TO_PASS}") from exc
