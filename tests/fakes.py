"""Deterministic stand-ins for the LLM layer, shared by tests.

``FakeBackend`` implements ``nl_rewrite.llm.base.LLMBackend`` without a model:
- ``chat``: scripted replies first (to test garbage handling), then ``reply_fn(request)``; by default it
  names the words the prompt marks with ``<< >>`` (so a good explanation really depends on the prompt).
- ``score``: ``score_fn(request, read_index)`` if given; else, for yes/no-style choices, favours the first choice when a word of the explanation (the text
  after the last ``Explanation:`` in the prefix) occurs in the segment read; digit choices get a
  deterministic pseudo-random distribution from a hash of the prompt.
It records every request, so tests can count calls.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Sequence

import torch

from nl_rewrite.llm.base import ChatRequest, ScoreRequest


def marked_words(prompt: str) -> list[str]:
    """The distinct texts inside ``<<`` ``>>`` in a prompt, in order of first appearance."""
    seen: list[str] = []
    for match in re.findall(r"<<(.+?)>>", prompt):
        word = match.strip()
        if word and word not in seen:
            seen.append(word)
    return seen


def default_reply(request: ChatRequest) -> str:
    user = "\n".join(content for role, content in request.messages if role == "user")
    words = marked_words(user)[:5]
    return f"Some reasoning first.\n[EXPLANATION]: the words {', '.join(repr(w) for w in words)}"


class FakeBackend:
    """See the module docstring."""

    def __init__(self, scripted: Sequence[str] = (), reply_fn: Callable[[ChatRequest], str] = default_reply,
                 backend_id: str = "fake:0",
                 score_fn: Callable[[ScoreRequest, int], torch.Tensor] | None = None) -> None:
        self.backend_id = backend_id
        self.score_fn = score_fn
        self.scripted = list(scripted)
        self.reply_fn = reply_fn
        self.chat_requests: list[ChatRequest] = []
        self.score_requests: list[ScoreRequest] = []

    def chat_prompt(self, request: ChatRequest) -> str:
        """A plain template: the fake has no tokenizer, but the simulator needs the backend's own template."""
        turns = "".join(f"### {role.capitalize()}\n{content}\n\n" for role, content in request.messages)
        return turns + "### Assistant\n" + request.prefill

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        replies = []
        for request in requests:
            self.chat_requests.append(request)
            replies.append(self.scripted.pop(0) if self.scripted else self.reply_fn(request))
        return replies

    def score(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        out = []
        for request in requests:
            self.score_requests.append(request)
            out.append(torch.stack([self._score_point(request, i) for i in request.read_after]))
        return out

    def _score_point(self, request: ScoreRequest, i: int) -> torch.Tensor:
        if self.score_fn is not None:
            return self.score_fn(request, i)
        if len(request.choices) == 2:
            explanation = request.prefix.rsplit("Explanation:", 1)[-1].lower()
            words = set(re.findall(r"[a-z0-9]+", explanation))
            hit = any(w in words for w in re.findall(r"[a-z0-9]+", request.segments[i].lower()))
            return torch.tensor([-0.1, -2.4]) if hit else torch.tensor([-2.4, -0.1])
        seed = int(hashlib.sha256((request.prompt + str(i)).encode()).hexdigest()[:8], 16)
        logits = torch.randn(len(request.choices), generator=torch.Generator().manual_seed(seed))
        return logits.log_softmax(-1)
