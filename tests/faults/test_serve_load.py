"""`nl-rewrite serve` under load: 32 concurrent clients mixing chat, score and malformed requests for a bounded
time. Every request is answered correctly or refused with a clear HTTP error, memory stays bounded (the figure
is printed), and the server still answers afterwards."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


CLIENTS = 32
SECONDS = 8.0
SCORE = {"prompt": "Rate how much each word is about animals, 0-9.\ncat\t", "max_tokens": 1, "temperature": 0,
         "logprobs": 5}
CHAT = {"messages": [{"role": "user", "content": "Name one animal."}], "max_tokens": 3, "temperature": 0}
MALFORMED = {"prompt": 42, "max_tokens": 1}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _one(root: str, kind: str, expected: dict) -> str:
    """One request of ``kind``; 'kind:ok' if the answer is right (or the refusal clear), else 'kind:bad <status>'."""
    if kind == "score":
        status, body = _post(f"{root}/completions", SCORE)
        top = body["choices"][0]["logprobs"]["top_logprobs"][0] if status == 200 else {}
        ok = top.keys() == expected["score"].keys() and all(abs(top[k] - v) < 1e-4 for k, v in expected["score"].items())
    elif kind == "chat":
        status, body = _post(f"{root}/chat/completions", CHAT)
        ok = status == 200 and body["choices"][0]["message"]["content"] == expected["chat"]
    else:
        status, body = _post(f"{root}/completions", MALFORMED)
        ok = status == 400 and "prompt must be a string" in body["error"]["message"]
    return f"{kind}:{'ok' if ok else f'bad {status}'}"


def _round(root: str, expected: dict, outcomes: list[str]) -> None:
    """``CLIENTS`` threads sending score, chat and malformed requests in turn for ``SECONDS``."""
    stop = time.monotonic() + SECONDS
    kinds = ("score", "chat", "malformed")

    def client(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            kind = kinds[(i + n) % 3]
            try:
                outcomes.append(_one(root, kind, expected))
            except Exception as exc:  # a reset connection or a malformed body counts as bad, never vanishes
                outcomes.append(f"{kind}:bad {type(exc).__name__}")
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + 300)
    assert not any(t.is_alive() for t in threads), "a client hung"


def test_32_clients_get_correct_answers_or_clear_errors(tmp_cache):
    from nl_rewrite.llm.embedded import EmbeddedBackend
    from nl_rewrite.llm.server import make_server

    server = make_server(EmbeddedBackend("tiny-smollm2"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}/v1"
    expected = {"score": _post(f"{root}/completions", SCORE)[1]["choices"][0]["logprobs"]["top_logprobs"][0],
                "chat": _post(f"{root}/chat/completions", CHAT)[1]["choices"][0]["message"]["content"]}
    rss = [_rss_mb()]
    outcomes: list[str] = []
    for _ in range(2):  # two equal rounds: memory may grow in the first (threads, allocator), not in the second
        _round(root, expected, outcomes)
        rss.append(_rss_mb())
    bad = [o for o in outcomes if not o.endswith(":ok")]
    print(f"serve load: {len(outcomes)} requests from {CLIENTS} clients in 2 x {SECONDS:.0f} s, {len(bad)} bad; "
          f"RSS {rss[0]:.0f} -> {rss[1]:.0f} -> {rss[2]:.0f} MB")
    assert outcomes and not bad, bad[:5]
    assert {o.split(":")[0] for o in outcomes} == {"score", "chat", "malformed"}
    assert rss[2] - rss[1] < 100  # bounded: the second round does not keep growing
    assert _post(f"{root}/chat/completions", CHAT)[1]["choices"][0]["message"]["content"] == expected["chat"]
    server.shutdown()
    server.server_close()
