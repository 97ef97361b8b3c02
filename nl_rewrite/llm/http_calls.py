"""Concurrent HTTP calls with retries, shared by the OpenAI-compatible and the SGLang backends.

Requests run concurrently (``AsyncOpenAI`` + a semaphore) behind a synchronous ``gather``. Connection errors,
timeouts, 408, 429 and 5xx are retried with exponential backoff, or after the server's ``Retry-After`` when it sends
one (seconds, capped at ``MAX_RETRY_AFTER``), except a 5xx whose message says the server cannot
do what was asked (for example llama.cpp's "logprobs is not supported for models created with logits_all=False"):
retrying that cannot succeed, so it fails at once with the server's message, as do a 501 and every other 4xx.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from nl_rewrite.errors import LLMError

T = TypeVar("T")
R = TypeVar("R")
Sink = Callable[[int, Any], None]
"""Receives (index of the request, its answer) the moment an answer arrives."""

CANNOT_SUCCEED = re.compile(r"not supported|unsupported|not implemented|logits_all|invalid|must be|cannot be",
                            re.IGNORECASE)
"""A 5xx message matching this is a refusal, not an outage."""
MAX_RETRY_AFTER = 300.0


class Rejected(LLMError):
    """The server refused the request (4xx, or a 5xx that says it cannot do this); retrying would not help."""


@dataclass(frozen=True)
class CallSettings:
    concurrency: int = 8
    timeout: float = 60
    max_retries: int = 4
    backoff: float = 1.0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.timeout <= 0 or self.max_retries < 0 or self.backoff < 0:
            raise ValueError(f"need concurrency >= 1, timeout > 0, max_retries >= 0, backoff >= 0; got "
                             f"{self.concurrency}, {self.timeout}, {self.max_retries}, {self.backoff}")


class ServerCalls:
    """Calls to one server root (``base_url``) through an ``AsyncOpenAI`` client; the key is never shown."""

    def __init__(self, base_url: str, api_key: str, settings: CallSettings) -> None:
        self.base_url, self._api_key, self.settings = base_url, api_key, settings
        self.waits: list[float] = []
        """Every backoff wait, in seconds, in order (for logs and tests)."""

    def gather(self, items: Sequence[T], one: Callable[[Any, T], Awaitable[R]], desc: str = "llm",
               sink: Sink | None = None) -> list[R]:
        """``one(client, item)`` for every item, at most ``concurrency`` at a time, results in order. ``sink(i,
        result)`` sees each result as it arrives, so a call that fails later loses none of the finished ones."""
        return run_sync(self._gather(items, one, desc, sink))

    async def _gather(self, items: Sequence[T], one: Callable[[Any, T], Awaitable[R]], desc: str,
                      sink: Sink | None) -> list[R]:
        from openai import AsyncOpenAI
        from tqdm import tqdm

        s = self.settings
        client = AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=s.timeout, max_retries=0)
        gate = asyncio.Semaphore(s.concurrency)
        with tqdm(total=len(items), desc=desc, unit="req", disable=not s.progress) as bar:
            async def run(index: int, item: T) -> R:
                async with gate:
                    out = await one(client, item)
                if sink is not None:
                    sink(index, out)
                bar.update(1)
                return out
            try:
                return await asyncio.gather(*(run(i, item) for i, item in enumerate(items)))
            finally:
                await client.close()

    async def call(self, make: Callable[[], Awaitable[R]]) -> R:
        """One HTTP call with retries and backoff; an ``LLMError`` naming the URL when it gives up."""
        import openai

        last: Exception | None = None
        for attempt in range(self.settings.max_retries + 1):
            refused: Rejected | None = None
            try:
                return await make()
            except (openai.APIConnectionError, openai.RateLimitError) as exc:
                last = exc
            except (json.JSONDecodeError, openai.APIResponseValidationError) as exc:
                last = exc  # a truncated or garbled body: a dropped connection by another name, worth a retry
            except openai.APIStatusError as exc:
                if not retryable(exc.status_code, str(exc.message)):
                    refused = self._rejected(exc)
                else:
                    last = exc
            if refused is not None:  # raised outside the handler: the openai error (echoed headers) stays unchained
                raise refused
            if attempt < self.settings.max_retries:
                told = retry_after(last)
                wait = told if told is not None else self.settings.backoff * 2 ** attempt * (1 + 0.25 * random.random())
                self.waits.append(wait)
                await asyncio.sleep(wait)
        message = (f"no answer from {self.base_url} after {self.settings.max_retries + 1} attempts: "
                   f"{type(last).__name__}: {short(self._scrub(str(last)))}")
        raise LLMError(message)

    def _rejected(self, exc: Any) -> Rejected:
        return Rejected(f"{self.base_url} answered HTTP {exc.status_code}: {short(self._scrub(str(exc.message)))}")

    def _scrub(self, text: str) -> str:
        """A server may echo the request's headers in an error; the key never reaches our messages."""
        return text.replace(self._api_key, "***") if self._api_key and self._api_key != "EMPTY" else text


def retryable(status: int, message: str) -> bool:
    """Timeouts (408), rate limits (429) and outages (500, 502-504) are worth retrying; a 500 that says the server
    cannot do this, a 501 and other 4xx are not (a gateway's 502-504 is always an outage, whatever it says)."""
    if status == 500:
        return not CANNOT_SUCCEED.search(message)
    return status in (408, 429) or 502 <= status <= 599


def retry_after(exc: Exception | None) -> float | None:
    """The server's ``Retry-After`` (in seconds) on an HTTP error, capped; ``None`` if it sent none we can read."""
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER) if value is not None else None
    except ValueError:  # an HTTP date: rare from inference servers; fall back to our own backoff
        return None


def short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def run_sync(coro: Awaitable[R]) -> R:
    """``asyncio.run``, also from code that already runs inside an event loop (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
