"""Servers that misbehave without failing: scores that change between identical requests, and errors that
echo the API key back."""

from __future__ import annotations

import logging
import random

import pytest

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest, ScoreRequest
from nl_rewrite.llm.openai_backend import OpenAIBackend
from nl_rewrite.llm.server import send_json

from helpers import serve_posts

KEY = "sk-test-0123456789abcdef"
REQUEST = ScoreRequest("Rate 0-9:\n", ("cat\t", "0\n", "dog\t"), (0, 2))


def serve(jitter: float, status: int = 200):
    """Completions with digit log-probs (plus ``jitter`` random noise), or ``status`` with the headers echoed."""

    def answer(handler) -> None:
        if status != 200:  # a careless proxy that puts the request's headers in its error text
            body = {"error": {"message": f"rejected request with headers {dict(handler.headers)}"}}
        else:
            top = {str(d): -2.3 - 0.1 * d + random.uniform(0, jitter) for d in range(10)}
            body = {"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "text": "0", "finish_reason": "length",
                 "logprobs": {"tokens": ["0"], "token_logprobs": [-2.3], "top_logprobs": [top], "text_offset": [0]}}]}
        send_json(handler, status, body)

    server = serve_posts(answer)
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.mark.parametrize("jitter,warned", [(0.0, False), (0.5, True)])
def test_scores_that_change_between_identical_requests_are_named_once(jitter, warned, caplog):
    server, url = serve(jitter)
    backend = OpenAIBackend(url, "m", score_mode="per_read", chat_template="smollm2-135m")
    with caplog.at_level(logging.WARNING, logger="nl_rewrite.llm.openai_backend"):
        backend.score([REQUEST])
        backend.score([REQUEST])
    assert ("not reproducible" in caplog.text) is warned
    assert caplog.text.count("not reproducible") <= 1 and (backend.report.repeat_max_diff > 0.05) is warned
    server.shutdown()


@pytest.mark.parametrize("status", [400, 503])
def test_the_api_key_never_appears_in_errors_logs_or_repr(status, caplog, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server, url = serve(0.0, status)
    backend = OpenAIBackend(url, "m", chat_template="smollm2-135m", max_retries=1)
    with caplog.at_level(logging.DEBUG), pytest.raises(LLMError) as err:
        backend.chat([ChatRequest((("user", "hi"),))])
    assert "***" in str(err.value)  # the echoed header was there, and was scrubbed
    texts = [str(err.value), repr(err.value), caplog.text, repr(backend), backend.backend_id, str(vars(backend))]
    assert not any(KEY in t for t in texts)
    chained = [err.value.__cause__, err.value.__context__]
    assert not any(KEY in str(c) or KEY in repr(getattr(c, "body", "")) for c in chained if c is not None)
    server.shutdown()
