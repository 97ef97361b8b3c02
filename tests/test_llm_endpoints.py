"""Several endpoints behind one backend: load spread over replicas, a concurrency limit per endpoint, a dead
endpoint taken out of rotation with no request lost or answered twice, every endpoint dead as one clear error.
Fast tests use small loopback fakes (deterministic answers, a record of simultaneous requests, and a switch that
kills the server after N answers); the slow test kills one of two real `nl-rewrite serve` processes mid-run."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from nl_rewrite.errors import LLMError
from nl_rewrite.llm import make_backend
from nl_rewrite.llm.base import ChatRequest, ScoreRequest
from nl_rewrite.llm.openai_backend import OpenAIBackend
from nl_rewrite.llm.server import send_json

CHATS = [ChatRequest((("user", f"question {i}"),), max_tokens=4) for i in range(24)]
SCORES = [ScoreRequest(f"prompt {i}: ", ("a", "b", "c"), (0, 2), ("0", "1")) for i in range(12)]
REFUSE = "please refuse"


@dataclass
class FakeState:
    """A fake server's settings and what it saw."""

    model: str = "m"
    delay: float = 0.02
    """Seconds each answer takes, so requests overlap."""
    die_after: int | None = None
    """After this many answers the server dies: its listener closes and open connections are dropped unanswered."""
    served: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    dead: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    state: FakeState
    server_ref: list[ThreadingHTTPServer]
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.state.model, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.state.lock:
            self.state.in_flight += 1
            self.state.max_in_flight = max(self.state.max_in_flight, self.state.in_flight)
        try:
            time.sleep(self.state.delay)
            self._answer(body)
        finally:
            with self.state.lock:
                self.state.in_flight -= 1

    def _answer(self, body: dict[str, Any]) -> None:
        if self.state.dead:  # a crashed server: the connection closes with no reply
            self.close_connection = True
            return
        if self.path == "/v1/chat/completions" and body["messages"][-1]["content"] == REFUSE:
            self._send(400, {"error": {"message": "refused on purpose"}})
            return
        self._send(200, chat_reply(body) if self.path == "/v1/chat/completions" else completion_reply(body))
        self._count_and_maybe_die()

    def _count_and_maybe_die(self) -> None:
        with self.state.lock:
            self.state.served += 1
            dies = self.state.served == self.state.die_after
            self.state.dead = self.state.dead or dies
        if dies:
            threading.Thread(target=_close, args=(self.server_ref[0],), daemon=True).start()

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        send_json(self, status, payload)


def chat_reply(body: dict[str, Any]) -> dict[str, Any]:
    content = f"answer to {body['messages'][-1]['content']}"
    return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


def completion_reply(body: dict[str, Any]) -> dict[str, Any]:
    """Log-probs that depend on the prompt only, so every replica gives the same numbers."""
    n = len(body["prompt"])
    top = {"0": -0.1 * (n % 7) - 0.05, "1": -1.0 - 0.01 * n}
    logprobs = {"tokens": ["0"], "text_offset": [0], "token_logprobs": [top["0"]], "top_logprobs": [top]}
    return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "text": "0", "logprobs": logprobs, "finish_reason": "length"}]}


def _close(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def start_fake(**settings: Any) -> tuple[ThreadingHTTPServer, FakeState, str]:
    """A fake on a free loopback port: the server, its state and its /v1 URL."""
    state, ref = FakeState(**settings), []
    handler = type("Handler", (_Handler,), {"state": state, "server_ref": ref})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    ref.append(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def fakes():
    """Starts fakes on demand; stops those still running after the test."""
    started: list[tuple[ThreadingHTTPServer, FakeState]] = []

    def make(**settings: Any) -> tuple[FakeState, str]:
        server, state, url = start_fake(**settings)
        started.append((server, state))
        return state, url

    yield make
    for server, state in started:
        if not state.dead:
            _close(server)


def _backend(urls: str | list[str], **options: Any) -> OpenAIBackend:
    return OpenAIBackend(urls, "m", **{"max_retries": 1, "timeout": 5.0, "check_repeat": False, **options})


def _free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def _report(backend: OpenAIBackend) -> dict[str, Any]:
    return {e.url: e for e in backend.endpoint_report()}


# ---- load and limits ---------------------------------------------------------------------------------


def test_requests_spread_over_both_endpoints_within_each_ones_limit(fakes):
    (a, url_a), (b, url_b) = fakes(), fakes()
    backend = _backend([url_a, url_b], concurrency=3)
    replies = backend.chat(CHATS)
    assert replies == [f"answer to question {i}" for i in range(len(CHATS))]
    assert a.served > 0 and b.served > 0 and a.served + b.served == len(CHATS)
    assert a.max_in_flight == 3 and b.max_in_flight == 3  # each endpoint full, never over its own limit
    report = _report(backend)
    assert (report[url_a].served, report[url_b].served) == (a.served, b.served)
    assert not report[url_a].dead and not report[url_b].dead


def test_one_endpoint_keeps_the_single_limit(fakes):
    state, url = fakes()
    assert _backend(url, concurrency=2).chat(CHATS[:8]) == [f"answer to question {i}" for i in range(8)]
    assert state.max_in_flight == 2 and state.served == 8


# ---- a dead endpoint --------------------------------------------------------------------------------


def test_a_server_dying_mid_run_loses_no_request(fakes, caplog):
    (_, url_single), (_, url_a), (dying, url_b) = fakes(), fakes(), fakes(die_after=3)
    expected = _backend(url_single, concurrency=2).chat(CHATS)
    seen: Counter[int] = Counter()
    backend = _backend([url_a, url_b], concurrency=2)
    with caplog.at_level(logging.WARNING, logger="nl_rewrite.llm.http_calls"):
        replies = backend.chat(CHATS, sink=lambda i, _: seen.update([i]))
    assert replies == expected
    assert seen == Counter(range(len(CHATS)))  # every answer delivered exactly once
    report = _report(backend)
    assert dying.dead and report[url_b].dead and not report[url_a].dead
    assert report[url_b].served == 3 and report[url_a].served == len(CHATS) - 3
    assert report[url_b].failures >= 1  # the request that found it dead, and any in flight with it
    assert f"no answer from {url_b}" in report[url_b].reason
    warnings = [r.getMessage() for r in caplog.records if "out of rotation" in r.getMessage()]
    assert len(warnings) == 1 and url_b in warnings[0]


def test_scores_survive_a_dying_server(fakes):
    """Per-read scoring makes two calls per request: a request cut short by the death restarts elsewhere."""
    (_, url_single), (_, url_a), (dying, url_b) = fakes(), fakes(), fakes(die_after=5)
    expected = _backend(url_single, score_mode="per_read").score(SCORES)
    backend = _backend([url_b, url_a], score_mode="per_read", concurrency=2)
    got = backend.score(SCORES)
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)
    assert dying.dead and _report(backend)[url_b].dead


def test_a_dead_endpoint_stays_out_of_later_batches(fakes):
    (a, url_a), (_, url_b) = fakes(), fakes(die_after=1)
    backend = _backend([url_a, url_b], concurrency=1)
    backend.chat(CHATS[:4])
    before = a.served
    assert backend.chat(CHATS[:4]) == [f"answer to question {i}" for i in range(4)]
    assert a.served == before + 4 and _report(backend)[url_b].dead


def test_every_endpoint_dead_is_one_error_naming_them_all():
    urls = [_free_url(), _free_url()]
    backend = _backend(urls, max_retries=0)
    with pytest.raises(LLMError, match="every endpoint is out of rotation") as err:
        backend.chat(CHATS[:3])
    assert all(url in str(err.value) for url in urls) and "drop the dead URLs" in str(err.value)
    assert all(e.dead for e in backend.endpoint_report())


def test_one_dead_endpoint_keeps_its_own_message():
    url = _free_url()
    with pytest.raises(LLMError, match=f"^no answer from {url} after 1 attempt: APIConnectionError"):
        _backend(url, max_retries=0).chat(CHATS[:2])


def test_a_refusal_is_not_an_endpoint_death(fakes):
    (_, url_a), (_, url_b) = fakes(), fakes()
    backend = _backend([url_a, url_b], concurrency=1)
    with pytest.raises(LLMError, match="HTTP 400.*refused on purpose"):
        backend.chat([ChatRequest((("user", "hello"),)), ChatRequest((("user", REFUSE),))])
    report = backend.endpoint_report()
    assert not any(e.dead for e in report) and sum(e.failures for e in report) == 1


# ---- settings --------------------------------------------------------------------------------------


def test_endpoints_serving_different_models_are_named(fakes):
    (a, url_a), (b, url_b) = fakes(model="m"), fakes(model="other")
    with pytest.raises(LLMError, match=f"{re.escape(url_b)} serves \\['other'\\] but .* serves \\['m'\\]"):
        _backend([url_a, url_b]).chat(CHATS[:1])
    assert a.served == 0 and b.served == 0  # checked before any request


def test_url_lists_from_spec_environment_and_sequence(monkeypatch):
    spec = make_backend("openai:m@http://h1:8000/v1, http://h2:8000/v1/")
    assert spec.calls.base_urls == ("http://h1:8000/v1", "http://h2:8000/v1")
    one = OpenAIBackend("http://h2:8000/v1", "m")
    reversed_ = OpenAIBackend(["http://h2:8000/v1", "http://h1:8000/v1"], "m")
    assert spec.backend_id == one.backend_id == reversed_.backend_id == "openai:m"  # one cache for any replica list
    monkeypatch.setenv("NL_REWRITE_BASE_URL", "http://h1:1/v1,http://h2:2/v1")
    assert OpenAIBackend(model="m").calls.base_urls == ("http://h1:1/v1", "http://h2:2/v1")
    with pytest.raises(ValueError, match="listed more than once; .*raise concurrency"):
        OpenAIBackend("http://h1:1/v1,http://h1:1/v1/", "m")
    with pytest.raises(ValueError, match="no endpoint URL"):
        OpenAIBackend(" , ", "m")


# ---- two real `nl-rewrite serve` processes -----------------------------------------------------------

PREFIX = "For each word, rate from 0 to 9 how much it is about animals.\n"
WORDS = ("cat", "table", "horse", "river", "dog", "cloud", "mouse", "chair")
SERVE_TIMEOUT = 45.0
"""Seconds for a server to load the model and listen (a few when its fp32 cache exists)."""


def _serve() -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two servers share two cores
    return subprocess.Popen([sys.executable, "-m", "nl_rewrite.cli.main", "serve", "--port", "0", "--model",
                             "tiny-smollm2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _drain(proc: subprocess.Popen, lines: queue.Queue[str | None]) -> None:
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)  # the server exited


def _url_of(proc: subprocess.Popen, deadline: float) -> str:
    """The /v1 URL the server prints once it listens; its output keeps being drained so it never blocks."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_drain, args=(proc, lines), daemon=True).start()
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        if found := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line):
            return found.group(1)
    pytest.fail(f"`nl-rewrite serve` did not start listening within {SERVE_TIMEOUT} s")


def test_killing_one_of_two_served_models_mid_run(tmp_cache):
    procs = [_serve(), _serve()]
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT
        url_a, url_b = (_url_of(proc, deadline) for proc in procs)
        requests = [ScoreRequest(PREFIX, (f"{word}\t",), (0,)) for word in WORDS]
        answered: list[int] = []

        def kill_b_after_two(index: int, _: torch.Tensor) -> None:
            answered.append(index)
            if len(answered) == 2:
                procs[1].kill()

        options = {"concurrency": 2, "max_retries": 1, "timeout": 30.0, "check_repeat": False, "score_mode": "per_read"}
        backend = OpenAIBackend([url_a, url_b], "tiny-smollm2", **options)
        got = backend.score(requests, sink=kill_b_after_two)
        expected = OpenAIBackend(url_a, "tiny-smollm2", **options).score(requests)
        for mine, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0, equal_nan=True)
        assert sorted(answered) == list(range(len(requests)))
        report = _report(backend)
        assert report[url_b].dead and not report[url_a].dead and report[url_a].served > 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
