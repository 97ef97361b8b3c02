"""Retries against a scripted loopback server: what the openai client retries, what fails at once (our refusal
rule, garbled replies), and Retry-After honoured. Error replies carry ``retry-after-ms: 10`` where the wait is not
the point, since the client's own backoff starts at 0.5 s; timing checks are lower bounds (plus a loose ceiling)."""

from __future__ import annotations

import json
import time

import pytest

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest
from nl_rewrite.llm.openai_backend import OpenAIBackend

from helpers import serve_posts

OK = {"id": "x", "object": "text_completion", "created": 0, "model": "m",
      "choices": [{"index": 0, "text": "fine", "logprobs": None, "finish_reason": "stop"}]}


FAST = {"retry-after-ms": "10"}
GARBLED, CUT = None, "cut"
"""Bodies: complete but not JSON; or cut off in transfer (shorter than its Content-Length, then the socket closes)."""


def scripted(answers: list[tuple[int, dict, dict | None | str]]):
    """A server answering POSTs with ``answers`` in order (status, headers, body), then 200 OK forever."""
    seen: list[int] = []

    def answer(handler) -> None:
        status, headers, body = answers.pop(0) if answers else (200, {}, OK)
        seen.append(status)
        headers = dict(headers)
        time.sleep(float(headers.pop("X-Sleep", 0)))  # a server that hangs before answering
        data = json.dumps(body).encode() if isinstance(body, dict) else b'{"id": "x", "choices": [{"te'
        length = len(data) + (100 if body == CUT else 0)
        handler.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(length), **headers}.items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
        handler.close_connection = body == CUT

    server = serve_posts(answer)
    return server, seen


def _backend(server, **options) -> OpenAIBackend:
    return OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", chat_template="smollm2-135m",
                         **{"max_retries": 2, **options})


def _chat(backend: OpenAIBackend) -> list[str]:
    return backend.chat([ChatRequest((("user", "hi"),))])


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "x"}}


@pytest.mark.parametrize("status,message", [(408, "timeout"), (409, "locked"), (429, "busy"), (500, "busy"),
                                            (502, "busy"), (503, "busy"),
                                            (504, "upstream sent an invalid response")])
def test_rate_limits_and_outages_are_retried(status, message):
    server, seen = scripted([(status, FAST, _error(message)), (status, FAST, _error(message))])
    assert _chat(_backend(server)) == ["fine"]
    assert seen == [status, status, 200]
    server.shutdown()


def test_without_retry_after_the_client_backs_off():
    server, seen = scripted([(503, {}, _error("busy"))])
    start = time.perf_counter()
    assert _chat(_backend(server)) == ["fine"]
    waited = time.perf_counter() - start
    assert seen == [503, 200]
    assert 0.5 * 0.75 <= waited < 10, "openai's first backoff: 0.5 s minus up to 25% jitter"
    server.shutdown()


def test_retry_after_is_honoured():
    # Backoff alone would wait at most 0.5 + 1.0 s: waiting longer shows both headers were read.
    server, seen = scripted([(429, {"Retry-After": "1"}, _error("slow down")),
                             (503, {"retry-after-ms": "700"}, _error("busy"))])
    start = time.perf_counter()
    assert _chat(_backend(server)) == ["fine"]
    assert 1.7 <= time.perf_counter() - start < 15
    assert seen == [429, 503, 200]
    server.shutdown()


def test_a_retry_after_beyond_two_minutes_is_not_waited_for():
    server, seen = scripted([(429, {"Retry-After": "500"}, _error("come back later"))])
    with pytest.raises(LLMError, match=r"no answer from .* after 1 attempt: RateLimitError.*come back later"):
        _chat(_backend(server))
    assert seen == [429]
    server.shutdown()


@pytest.mark.parametrize("status,message", [(400, "bad request"), (404, "no such model"),
                                            (500, "logprobs is not supported for models created with logits_all=False"),
                                            (501, "not here")])
def test_refusals_fail_at_once_with_the_servers_message(status, message):
    server, seen = scripted([(status, FAST, _error(message))])
    with pytest.raises(LLMError, match=f"HTTP {status}.*{message}"):
        _chat(_backend(server))
    assert seen == [status]
    server.shutdown()


def test_giving_up_names_the_url_and_attempts():
    server, seen = scripted([(503, FAST, _error("down"))] * 5)
    with pytest.raises(LLMError, match=r"no answer from http://127\.0\.0\.1:\d+/v1 after 3 attempts"):
        _chat(_backend(server, max_retries=2))
    assert seen == [503] * 3
    server.shutdown()


def test_the_attempts_named_are_the_attempts_made():
    """Counted by our own request hook, not read from the client's headers: a server that says not to retry its
    503 gets one attempt, and the message says one."""
    server, seen = scripted([(503, {"x-should-retry": "false"}, _error("down"))] * 3)
    with pytest.raises(LLMError, match=r"no answer from http://127\.0\.0\.1:\d+/v1 after 1 attempt: "):
        _chat(_backend(server, max_retries=2))
    assert seen == [503]
    server.shutdown()


def test_a_garbled_reply_is_named_and_not_retried():
    # A complete 200 whose body is not JSON: a server bug, which asking again is unlikely to fix (openai does not
    # retry it either).
    server, seen = scripted([(200, {}, GARBLED)] * 3)
    with pytest.raises(LLMError, match=r"not valid JSON .*not retried.*JSONDecodeError"):
        _chat(_backend(server))
    assert seen == [200]
    server.shutdown()


def test_a_reply_cut_off_in_transfer_is_retried():
    server, seen = scripted([(200, FAST, CUT)])
    assert _chat(_backend(server)) == ["fine"]
    assert seen == [200, 200]
    server.shutdown()


def test_a_hung_server_times_out_and_is_named():
    server, seen = scripted([(200, {"X-Sleep": "3"}, OK) for _ in range(3)])
    with pytest.raises(LLMError, match=r"after 2 attempts: APITimeoutError"):
        _chat(_backend(server, max_retries=1, timeout=0.5))
    server.shutdown()
