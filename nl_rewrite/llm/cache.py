"""An on-disk cache of LLM calls, so a rerun or a resume never repeats a finished call.

One sqlite row per (backend_id, request key): chat replies as text, score results as safetensors
bytes (``-inf`` survives the round trip). The database runs in WAL mode and commits after every
chunk the inner backend answers, so a kill -9 loses at most the chunk in flight; a backend that streams answers
(the HTTP backends) has each answer committed the moment it arrives, so a server that dies mid-call loses none.

Sampled chat requests (temperature > 0) are cached too: a rerun gets the same reply, which is what
resuming needs. A score result with an unknown read point (a NaN row: a server left choices out of its top-K) is
not stored, so a rerun, perhaps with a larger K, asks again instead of inheriting the gap.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch
from filelock import FileLock
from jaxtyping import Float
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from nl_rewrite.llm.base import ChatRequest, LLMBackend, ScoreRequest

log = logging.getLogger(__name__)

R = TypeVar("R", ChatRequest, ScoreRequest)
V = TypeVar("V")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    backend_id TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (backend_id, key)
)
"""


class CachedBackend:
    """Wraps any ``LLMBackend``; answers repeated requests from ``path`` (a sqlite file).

    ``new_calls`` counts requests sent to the inner backend, ``hits`` those answered from disk.
    ``chunk_size`` requests are sent to the inner backend at a time and committed together.
    """

    def __init__(self, inner: LLMBackend, path: Path | str, chunk_size: int = 32, check: bool = True) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.inner = inner
        self.backend_id = inner.backend_id
        self.path = Path(path)
        self.chunk_size = chunk_size
        self.new_calls = 0
        self.hits = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _open(self.path, check)
        self._lock = threading.Lock()

    def __reduce__(self):
        """Pickled as its recipe: a worker that receives it opens its own connection to the same sqlite file."""
        # workers may run elsewhere; the process that pickled it has already checked the file
        return (CachedBackend, (self.inner, self.path.resolve(), self.chunk_size, False))

    def __repr__(self) -> str:
        return f"CachedBackend({self.inner!r}, path={str(self.path)!r})"

    def close(self) -> None:
        self._db.close()

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        return self._cached(requests, "chat", self.inner.chat, _encode_text, _decode_text, lambda _: True)

    def score(self, requests: Sequence[ScoreRequest]) -> list[Float[Tensor, "n_read n_choices"]]:
        return self._cached(requests, "score", self.inner.score, _encode_tensor, _decode_tensor, _fully_known)

    def _cached(self, requests: Sequence[R], kind: str, call: Callable[[list[R]], list[V]],
                encode: Callable[[V], bytes], decode: Callable[[bytes], V], keep: Callable[[V], bool]) -> list[V]:
        keys = [r.key() for r in requests]
        found = {k: decode(v) for k, v in self._lookup(keys).items()}
        self.hits += sum(k in found for k in keys)
        missing = list({k: r for k, r in zip(keys, requests) if k not in found}.items())  # dedupe repeats
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start:start + self.chunk_size]
            answers = self._call_chunk(kind, chunk, call, encode, keep)
            self.new_calls += len(chunk)
            found.update((k, a) for (k, _), a in zip(chunk, answers))
        return [found[k] for k in keys]

    def _call_chunk(self, kind: str, chunk: list[tuple[str, R]], call: Callable[..., list[V]],
                    encode: Callable[[V], bytes], keep: Callable[[V], bool]) -> list[V]:
        """One chunk to the inner backend. A backend that streams answers has each one committed as it arrives,
        so a call that dies half-way (a killed server) keeps every answer it already got."""
        if not getattr(self.inner, "streams_answers", False):
            answers = call([r for _, r in chunk])
            self._store(kind, [(k, encode(a)) for (k, _), a in zip(chunk, answers) if keep(a)])
            return answers

        def sink(i: int, answer: V) -> None:
            if keep(answer):
                self._store(kind, [(chunk[i][0], encode(answer))])

        return call([r for _, r in chunk], sink=sink)

    def _lookup(self, keys: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):  # stay under sqlite's bound-variable limit
                part = unique[start:start + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(f"SELECT key, value FROM calls WHERE backend_id = ? AND key IN ({marks})",
                                        [self.backend_id, *part])
                out.update(rows.fetchall())
        return out

    def _store(self, kind: str, rows: list[tuple[str, bytes]]) -> None:
        with self._lock, self._db:  # one transaction per chunk: committed, or not there at all
            self._db.executemany("INSERT OR REPLACE INTO calls (backend_id, key, kind, value) VALUES (?, ?, ?, ?)",
                                 [(self.backend_id, k, kind, v) for k, v in rows])


def _encode_text(text: str) -> bytes:
    return text.encode("utf-8")


def _decode_text(blob: bytes) -> str:
    return bytes(blob).decode("utf-8")


def _open(path: Path, check: bool = True) -> sqlite3.Connection:
    """The cache database. A file that is not one, or is damaged, is moved aside (``<name>.corrupt-<time>``, kept
    for a look) with a warning naming it, and an empty cache starts: its calls are asked again. Processes sharing
    the cache (Ray workers, parallel runs) decide that under a lock, so only one moves it and none loses calls.
    ``check`` runs sqlite's ``quick_check`` (linear in the file) to find a truncated file now, not mid-run."""
    try:
        return _connect(path, check)
    except sqlite3.DatabaseError as exc:
        if not _corrupt(exc):
            raise  # locked, read-only, missing folder: not corruption, so not moved aside
    with FileLock(f"{path}.lock"):
        try:
            return _connect(path)  # another process may have replaced it meanwhile
        except sqlite3.DatabaseError as exc:
            if not _corrupt(exc):
                raise
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            log.warning("LLM call cache %s cannot be read (%s); moved it to %s and started an empty one (its calls "
                        "are asked again)", path, exc, aside)
            os.replace(path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return _connect(path)


def _corrupt(exc: sqlite3.DatabaseError) -> bool:
    return any(s in str(exc) for s in ("not a database", "malformed", "quick_check"))


def _connect(path: Path, check: bool = True) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, timeout=60)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode still safe against a killed process; far fewer fsyncs
        db.execute(_SCHEMA)
        db.commit()
        # a truncated file opens, and fails only on the pages it lost: find out now (linear in the file, fast)
        verdict = db.execute("PRAGMA quick_check").fetchone()[0] if check else "ok"
        if verdict != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {verdict}")
        return db
    except BaseException:
        db.close()
        raise


def _fully_known(tensor: Tensor) -> bool:
    return not bool(torch.isnan(tensor).any())


def _encode_tensor(tensor: Tensor) -> bytes:
    return save_tensors({"logprobs": tensor.detach().cpu().contiguous()})


def _decode_tensor(blob: bytes) -> Tensor:
    return load_tensors(bytes(blob))["logprobs"]
