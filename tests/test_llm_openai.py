"""The OpenAI backend over real HTTP: against `nl-rewrite serve` (embedded SmolLM2), a server that gives no
logprobs, and a dead port. Plus settings from the environment and the API key kept out of sight."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest, ScoreRequest
from nl_rewrite.llm.openai_backend import OpenAIBackend
from nl_rewrite.llm.readout import usable_rows

PREFIX = "For each word, rate from 0 to 9 how much it is about animals.\n" * 3
REQUESTS = [
    ScoreRequest(PREFIX, ("cat\t", "8\n", "the\t", "0\n", "horse\t"), (0, 2, 4)),
    ScoreRequest(PREFIX, ("table\t",), (0,)),
]


@pytest.fixture(scope="module")
def embedded():
    from nl_rewrite.llm.embedded import EmbeddedBackend

    return EmbeddedBackend("tiny-smollm2")


@pytest.fixture(scope="module")
def served(embedded):
    """`nl-rewrite serve`'s server on a free loopback port, in a thread; yields its /v1 URL."""
    from nl_rewrite.llm.server import make_server

    server = make_server(embedded, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _assert_matches_embedded(remote: list[torch.Tensor], local: list[torch.Tensor]) -> None:
    for r, e in zip(remote, local):
        assert r.shape == e.shape
        answered = usable_rows(r)
        assert answered.sum() >= r.shape[0] - 1  # at most one read point left unknown (NaN) per request
        for row_r, row_e in zip(r[answered], e[answered]):
            known = torch.isfinite(row_r)
            torch.testing.assert_close(row_r[known], row_e[known], atol=1e-3, rtol=0)
            # a choice the server left out (-inf) is negligible: under a tenth of the mass it did list
            assert row_e[~known].exp().sum() <= 0.101 * row_e[known].exp().sum()


def test_echo_scores_match_the_embedded_backend(served, embedded):
    backend = OpenAIBackend(served, "tiny-smollm2")
    remote = backend.score(REQUESTS)
    assert backend.score_mode == "echo"  # auto-detected: our server honours echo
    _assert_matches_embedded(remote, embedded.score(REQUESTS))


def test_per_read_scores_match_the_embedded_backend(served, embedded):
    backend = OpenAIBackend(served, "tiny-smollm2", score_mode="per_read", concurrency=2)
    _assert_matches_embedded(backend.score(REQUESTS), embedded.score(REQUESTS))


def test_read_point_inside_a_server_token_is_named(served):
    backend = OpenAIBackend(served, "tiny-smollm2", score_mode="echo")
    with pytest.raises(LLMError, match="falls inside the server's token"):
        backend.score([ScoreRequest(PREFIX, ("hor", "se\t"), (0,))])  # "horse" is one token


def test_auto_reads_a_point_inside_a_server_token_per_read(served, embedded):
    backend = OpenAIBackend(served, "tiny-smollm2")
    split = [ScoreRequest(PREFIX, ("hor", "se\t"), (0, 1))]  # "horse" is one token: "hor" ends inside it
    remote = backend.score(REQUESTS + split)
    assert backend.score_mode == "echo" and backend.report.echo_fallbacks == 1
    assert remote[-1].shape == (2, 10) and torch.isfinite(remote[-1][1]).any()  # read per-read, not refused


def test_chat_over_http_returns_the_embedded_reply(served, embedded):
    request = ChatRequest((("user", "Name one animal."),), max_tokens=10, prefill="My answer is:")
    remote = OpenAIBackend(served, "tiny-smollm2").chat([request])
    assert remote[0].strip() and remote == embedded.chat([request])


class _NoLogprobsHandler(BaseHTTPRequestHandler):
    """A completions server that, like many hosted models, ignores `logprobs`."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"id": "x", "object": "text_completion", "created": 0, "model": "m",
                           "choices": [{"index": 0, "text": "3", "logprobs": None, "finish_reason": "length"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


def test_server_without_logprobs_is_a_clear_error():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoLogprobsHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", "m")
        with pytest.raises(LLMError, match="no logprobs"):
            backend.score(REQUESTS[:1])
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_is_an_error_naming_the_url():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    backend = OpenAIBackend(url, "m", max_retries=1, timeout=5)
    with pytest.raises(LLMError, match=f"no answer from {url} after 2 attempts"):
        backend.chat([ChatRequest((("user", "hi"),))])


def test_settings_from_environment_and_the_key_stays_hidden(monkeypatch):
    monkeypatch.setenv("NL_REWRITE_BASE_URL", "http://example.invalid:1234/v1/")
    monkeypatch.setenv("NL_REWRITE_MODEL", "some-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    backend = OpenAIBackend()
    assert (backend.base_url, backend.model) == ("http://example.invalid:1234/v1", "some-model")
    for text in (repr(backend), backend.backend_id, str(vars(backend).get("backend_id"))):
        assert "sk-very-secret" not in text
    monkeypatch.delenv("NL_REWRITE_MODEL")
    with pytest.raises(LLMError, match="NL_REWRITE_MODEL"):
        OpenAIBackend()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="score_mode"):
        OpenAIBackend("http://x/v1", "m", score_mode="magic")
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIBackend("http://x/v1", "m", concurrency=0)


def test_serve_command_answers_models_and_chat(tmp_cache):
    """The CLI end to end: `nl-rewrite serve` (the tiny model) in a subprocess, then plain HTTP and the OpenAI
    backend."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nl_rewrite.cli.main", "serve", "--port", str(port),
                             "--model", "tiny-smollm2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("serving"):
                break
        else:
            pytest.fail("serve exited before listening")
        url = f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(url + "/models", timeout=30) as reply:
            assert json.load(reply)["data"][0]["id"] == "tiny-smollm2"
        text = OpenAIBackend(url, "tiny-smollm2").chat([ChatRequest((("user", "Say hi."),), max_tokens=5)])
        assert text[0].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
