"""Retries against a scripted loopback server: what is retried, what fails at once, and Retry-After honoured."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest
from nl_rewrite.llm.openai_backend import OpenAIBackend

OK = {"id": "x", "object": "text_completion", "created": 0, "model": "m",
      "choices": [{"index": 0, "text": "fine", "logprobs": None, "finish_reason": "stop"}]}


def scripted(answers: list[tuple[int, dict, dict]]):
    """A server answering POSTs with ``answers`` in order (status, headers, body), then 200 OK forever."""
    seen: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status, headers, body = answers.pop(0) if answers else (200, {}, OK)
            seen.append(status)
            time.sleep(float(headers.pop("X-Sleep", 0)))  # a server that hangs before answering
            data = json.dumps(body).encode() if body is not None else b'{"id": "x", "choices": [{"te'  # cut off
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def _backend(server, **options) -> OpenAIBackend:
    return OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", chat_template="smollm2-135m",
                         backoff=0.01, **options)


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "x"}}


@pytest.mark.parametrize("status,message", [(408, "timeout"), (429, "busy"), (500, "busy"), (502, "busy"),
                                            (503, "busy"), (504, "upstream sent an invalid response")])
def test_rate_limits_and_outages_are_retried(status, message):
    server, seen = scripted([(status, {}, _error(message)), (status, {}, _error(message))])
    backend = _backend(server)
    assert backend.chat([ChatRequest((("user", "hi"),))]) == ["fine"]
    assert seen == [status, status, 200] and len(backend.calls.waits) == 2
    server.shutdown()


def test_retry_after_is_honoured():
    server, seen = scripted([(429, {"Retry-After": "0.3"}, _error("slow down")), (503, {"Retry-After": "0"}, {})])
    backend = _backend(server)
    backend.chat([ChatRequest((("user", "hi"),))])
    assert backend.calls.waits == [0.3, 0.0]
    server.shutdown()


@pytest.mark.parametrize("status,message", [(400, "bad request"), (404, "no such model"),
                                            (500, "logprobs is not supported for models created with logits_all=False"),
                                            (501, "not here")])
def test_refusals_fail_at_once_with_the_servers_message(status, message):
    server, seen = scripted([(status, {}, _error(message))])
    backend = _backend(server)
    with pytest.raises(LLMError, match=f"HTTP {status}.*{message}"):
        backend.chat([ChatRequest((("user", "hi"),))])
    assert seen == [status] and backend.calls.waits == []
    server.shutdown()


def test_giving_up_names_the_url_and_attempts():
    server, seen = scripted([(503, {}, _error("down"))] * 5)
    backend = _backend(server, max_retries=2)
    with pytest.raises(LLMError, match=r"no answer from http://127\.0\.0\.1:\d+/v1 after 3 attempts"):
        backend.chat([ChatRequest((("user", "hi"),))])
    server.shutdown()


def test_a_truncated_reply_is_retried_then_named():
    truncated = (200, {}, None)
    server, seen = scripted([truncated] * 3)
    backend = _backend(server, max_retries=1)
    with pytest.raises(LLMError, match=r"after 2 attempts: JSONDecodeError"):
        backend.chat([ChatRequest((("user", "hi"),))])
    server.shutdown()


def test_a_hung_server_times_out_and_is_named():
    server, seen = scripted([(200, {"X-Sleep": "3"}, OK) for _ in range(3)])
    backend = _backend(server, max_retries=1, timeout=0.5)
    with pytest.raises(LLMError, match=r"after 2 attempts: APITimeoutError"):
        backend.chat([ChatRequest((("user", "hi"),))])
    server.shutdown()
