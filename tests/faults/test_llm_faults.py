"""LLM faults: a server that dies mid-call loses no finished answer, and a rerun redoes none of them."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest
from nl_rewrite.llm.cache import CachedBackend
from nl_rewrite.llm.openai_backend import OpenAIBackend
from nl_rewrite.llm.server import send_json


class Flaky:
    """Answers completions until ``budget`` runs out, then 503 (a dying server) until ``revive()``."""

    def __init__(self, budget: int):
        self.budget, self.answered = budget, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.budget <= 0:
                    return self._send(503, {"error": {"message": "server shutting down"}})
                outer.budget -= 1
                outer.answered.append(body["prompt"])
                n = len(outer.answered)
                top = {str(d): -1.0 - 0.1 * ((d + n) % 10) for d in range(10)}  # every digit, so nothing unknown
                logprobs = {"tokens": ["0"], "token_logprobs": [-1.0], "top_logprobs": [top], "text_offset": [0]}
                self._send(200, {"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": [
                    {"index": 0, "text": f"reply {n}", "logprobs": logprobs if body.get("logprobs") else None,
                     "finish_reason": "stop"}]})

            def _send(self, status, body):
                send_json(self, status, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def revive(self, budget: int = 1000) -> None:
        self.budget = budget


@pytest.fixture()
def flaky():
    server = Flaky(budget=3)
    yield server
    server.server.shutdown()


def test_a_server_dying_mid_call_keeps_every_answer_it_gave(flaky, tmp_path):
    requests = [ChatRequest((("user", f"question {i}"),), max_tokens=5) for i in range(6)]

    def backend() -> CachedBackend:
        inner = OpenAIBackend(flaky.url, "m", chat_template="smollm2-135m", concurrency=1, max_retries=1)
        return CachedBackend(inner, tmp_path / "calls.sqlite")

    first = backend()
    with pytest.raises(LLMError, match="no answer from .* after 2 attempts"):
        first.chat(requests)
    flaky.revive()
    second = backend()
    replies = second.chat(requests)
    assert second.hits == 3 and second.new_calls == 3  # the three answered before the failure are not redone
    assert replies[:3] == ["reply 1", "reply 2", "reply 3"]
    assert len(flaky.answered) == 6 and len(set(flaky.answered)) == 6  # each question reached the server once


def test_a_server_dying_mid_simulation_keeps_every_score_it_gave(flaky, tmp_path):
    from nl_rewrite.interp.simulate import SimulationItem, Simulator

    items = [SimulationItem(f"explanation {i}", ("The", " cat")) for i in range(3)]  # 2 reads each: 6 calls

    def simulator() -> tuple[Simulator, CachedBackend]:
        inner = OpenAIBackend(flaky.url, "m", chat_template="smollm2-135m", score_mode="per_read", concurrency=1,
                              max_retries=1, check_repeat=False)
        cached = CachedBackend(inner, tmp_path / "calls.sqlite")  # one chunk: only streaming saves answers
        return Simulator(cached, "paper"), cached  # paper mode: one request (and call) per token

    first, _ = simulator()
    with pytest.raises(LLMError, match="no answer from"):
        first.simulate_many(items)
    flaky.revive()
    second, cache = simulator()
    scores = second.simulate_many(items)
    assert cache.hits == 3 and cache.new_calls == 3  # the three scores given before the failure are not redone
    assert all(bool(s.isfinite().all()) for s in scores)
    assert len(flaky.answered) == 6 and len(set(flaky.answered)) == 6
