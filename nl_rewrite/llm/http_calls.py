"""Concurrent HTTP calls, shared by the OpenAI-compatible and the SGLang backends.

Requests run concurrently (``AsyncOpenAI`` + a semaphore) behind a synchronous ``gather``. Retries are the openai
client's own (``max_retries``): it retries connection errors, timeouts, 408, 409, 429 and every 5xx; it waits what the
server asks in ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date) when that is more than 0 and at most 2
minutes, gives up at once when it is longer, and otherwise backs off exponentially (0.5 s doubling, at most 8 s, minus
up to 25% jitter); a response header ``x-should-retry: true|false`` overrides all of this.

We add one rule: a 5xx whose body says the server cannot do what was asked (for example llama.cpp's "logprobs is not
supported for models created with logits_all=False"), and every 501, is marked ``x-should-retry: false`` as it
arrives, since retrying it cannot succeed. It fails at once with the server's message (:class:`Rejected`), as does
every other 4xx. A 200 whose body is not valid JSON (a buggy server or proxy; a body cut off in transfer is a
connection error, which the client retries) is not retried either: it fails with an ``LLMError`` that says so.
What we raise never chains the openai error, which may echo request headers; the API key is scrubbed from messages.
"""

from __future__ import annotations

import asyncio
import json
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
"""A 500 whose body matches this is a refusal, not an outage."""
RETRIED_4XX = (408, 409, 429)
"""The 4xx statuses the openai client retries (with every 5xx)."""


class Rejected(LLMError):
    """The server refused the request (4xx, or a 5xx that says it cannot do this); retrying would not help."""


@dataclass(frozen=True)
class CallSettings:
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 4
    """Retries after the first attempt, made by the openai client (its backoff and Retry-After handling)."""
    progress: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.timeout <= 0 or self.max_retries < 0:
            raise ValueError(f"need concurrency >= 1, timeout > 0, max_retries >= 0; got "
                             f"{self.concurrency}, {self.timeout}, {self.max_retries}")


class ServerCalls:
    """Calls to one server root (``base_url``) through an ``AsyncOpenAI`` client; the key is never shown."""

    def __init__(self, base_url: str, api_key: str, settings: CallSettings) -> None:
        self.base_url, self._api_key, self.settings = base_url, api_key, settings

    def gather(self, items: Sequence[T], one: Callable[[Any, T], Awaitable[R]], desc: str = "llm",
               sink: Sink | None = None) -> list[R]:
        """``one(client, item)`` for every item, at most ``concurrency`` at a time, results in order. ``sink(i,
        result)`` sees each result as it arrives, so a call that fails later loses none of the finished ones."""
        return run_sync(self._gather(items, one, desc, sink))

    async def _gather(self, items: Sequence[T], one: Callable[[Any, T], Awaitable[R]], desc: str,
                      sink: Sink | None) -> list[R]:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient
        from tqdm import tqdm

        s = self.settings
        http = DefaultAsyncHttpxClient(event_hooks={"response": [_mark_refusals]})  # closed with the client
        client = AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=s.timeout,
                             max_retries=s.max_retries, http_client=http)
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
        """One HTTP call, retried by the openai client; :class:`Rejected` when the server refuses it, an
        ``LLMError`` naming the URL and the attempts made when the client gives up."""
        import openai

        try:
            return await make()
        except openai.APIStatusError as exc:
            failure = (self._rejected(exc) if refused(exc.status_code, str(exc.message))
                       else self._gave_up(exc))
        except openai.APIConnectionError as exc:  # APITimeoutError too
            failure = self._gave_up(exc)
        except (json.JSONDecodeError, openai.APIResponseValidationError) as exc:
            failure = LLMError(f"{self.base_url} answered with a body that is not valid JSON (garbled or truncated "
                               f"by the server; not retried): {type(exc).__name__}: {short(self._scrub(str(exc)))}")
        raise failure  # raised outside the handler: the openai error (echoed headers) stays unchained

    def _gave_up(self, exc: Any) -> LLMError:
        n = attempts(exc, self.settings.max_retries)
        return LLMError(f"no answer from {self.base_url} after {n} attempt{'s' if n != 1 else ''}: "
                        f"{type(exc).__name__}: {short(self._scrub(str(exc)))}")

    def _rejected(self, exc: Any) -> Rejected:
        return Rejected(f"{self.base_url} answered HTTP {exc.status_code}: {short(self._scrub(str(exc.message)))}")

    def _scrub(self, text: str) -> str:
        """A server may echo the request's headers in an error; the key never reaches our messages."""
        return text.replace(self._api_key, "***") if self._api_key and self._api_key != "EMPTY" else text


def refused(status: int, message: str) -> bool:
    """The server said no, and asking again would not change that: a 4xx other than 408/409/429, a 501, or a 500
    whose message says the server cannot do this. (A gateway's 502-504 is always an outage, whatever it says.)"""
    if status == 500:
        return bool(CANNOT_SUCCEED.search(message))
    return status == 501 or (400 <= status < 500 and status not in RETRIED_4XX)


async def _mark_refusals(response: Any) -> None:
    """Response hook: mark a 5xx refusal ``x-should-retry: false``, which the openai client obeys (no retries)."""
    if response.status_code >= 500 and response.headers.get("x-should-retry") != "false":
        await response.aread()  # a short error body; the client reads it from the cache
        if refused(response.status_code, response.text):
            response.headers["x-should-retry"] = "false"


def attempts(exc: Exception, max_retries: int) -> int:
    """How many attempts the openai client made before raising ``exc``: it numbers each request's retries in the
    ``x-stainless-retry-count`` header (``max_retries + 1`` if that is missing)."""
    request = getattr(exc, "request", None)
    count = request.headers.get("x-stainless-retry-count") if request is not None else None
    return int(count) + 1 if count is not None and count.isdigit() else max_retries + 1


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
