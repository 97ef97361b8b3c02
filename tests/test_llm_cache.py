"""CachedBackend: request keys, hit/miss counters, tensors and text round-trip, survival of kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nl_rewrite.llm.base import ChatRequest, ScoreRequest
from nl_rewrite.llm.cache import CachedBackend

from helpers import CountingBackend, chat_requests as _chats, score_requests as _scores


def test_request_keys_cover_what_changes_the_answer():
    base = ChatRequest((("user", "hi"),))
    assert base.key() == ChatRequest((("user", "hi"),)).key()
    for other in (ChatRequest((("user", "hi!"),)), ChatRequest((("user", "hi"),), max_tokens=7),
                  ChatRequest((("user", "hi"),), temperature=0.5), ChatRequest((("user", "hi"),), prefill="A")):
        assert other.key() != base.key()
    s = ScoreRequest("p", ("a", "b"), (0,))
    assert s.key() == ScoreRequest("p", ("a", "b"), (0,), meta=(("latent", "3"),)).key()  # meta is a label only
    assert s.key() != ScoreRequest("p", ("ab",), (0,)).key()  # same text, different read points
    assert s.key() != ScoreRequest("p", ("a", "b"), (1,)).key()
    assert s.key() != ScoreRequest("p", ("a", "b"), (0,), choices=("Yes", "No")).key()


def test_second_run_issues_no_new_calls(tmp_path: Path):
    inner = CountingBackend()
    first = CachedBackend(inner, tmp_path / "llm.sqlite", chunk_size=3)
    replies = first.chat(_chats(7))
    scores = first.score(_scores(5))
    assert (first.new_calls, first.hits, inner.calls) == (12, 0, 12)
    first.close()

    again = CachedBackend(inner, tmp_path / "llm.sqlite")
    assert again.chat(_chats(7)) == replies
    for a, b in zip(again.score(_scores(5)), scores):
        torch.testing.assert_close(a, b)
        assert a[0, 0] == float("-inf")
    assert (again.new_calls, again.hits, inner.calls) == (0, 12, 12)


def test_partial_overlap_and_repeats_in_one_call(tmp_path: Path):
    inner = CountingBackend()
    cached = CachedBackend(inner, tmp_path / "llm.sqlite")
    cached.chat(_chats(3))
    requests = _chats(5) + _chats(5)  # 3 known, 2 new, each twice
    replies = cached.chat(requests)
    assert replies[:5] == replies[5:]
    assert inner.calls == 5 and cached.new_calls == 5 and cached.hits == 6


def test_backends_do_not_share_rows(tmp_path: Path):
    inner = CountingBackend()
    CachedBackend(inner, tmp_path / "llm.sqlite").chat(_chats(2))
    other = CountingBackend()
    other.backend_id = "counting:v2"
    cached = CachedBackend(other, tmp_path / "llm.sqlite")
    cached.chat(_chats(2))
    assert cached.new_calls == 2 and other.calls == 2


_KILLED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from helpers import CountingBackend, chat_requests as _chats
    from nl_rewrite.llm.cache import CachedBackend

    class Slow(CountingBackend):
        def chat(self, requests):
            time.sleep(0.3)
            out = super().chat(requests)
            print("answered", self.calls, flush=True)
            return out

    CachedBackend(Slow(), {db!r}, chunk_size=2).chat(_chats(40))
""")


def test_kill_9_keeps_finished_chunks(tmp_path: Path):
    db = tmp_path / "llm.sqlite"
    script = _KILLED_RUN.format(tests=str(Path(__file__).parent), db=str(db))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until a few chunks are answered, then kill without warning
        if line.startswith("answered") and int(line.split()[1]) >= 6:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as con:
        saved = con.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    assert 4 <= saved < 40 and saved % 2 == 0  # whole chunks only

    inner = CountingBackend()
    resumed = CachedBackend(inner, db)
    replies = resumed.chat(_chats(40))
    assert inner.calls == 40 - saved and resumed.hits == saved
    assert replies == CountingBackend().chat(_chats(40))
