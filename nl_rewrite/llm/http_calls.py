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

**Several endpoints** (replicas of one model, ``base_urls``): each has its own concurrency limit, and each request
goes to the live endpoint with the fewest requests in flight. An endpoint that gives no answer after the client's
retries (a connection error or a timeout: :class:`EndpointDown`) is taken out of rotation for the rest of the
backend's life, named once in a warning, and the request runs again from the start on another endpoint; its answer
is delivered once. A refusal (:class:`Rejected`) or a bad reply fails the request as with one endpoint. When every
endpoint is out, the batch fails with an ``LLMError`` naming them all; the next batch tries them all again (so one
endpoint behaves as it always did). ``endpoint_report()`` counts, per URL, requests served and failed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from nl_rewrite.errors import LLMError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Sink = Callable[[int, Any], None]
"""Receives (index of the request, its answer) the moment an answer arrives."""

CANNOT_SUCCEED = re.compile(r"not supported|unsupported|not implemented|logits_all|invalid|must be|cannot be",
                            re.IGNORECASE)
"""A 500 whose body matches this is a refusal, not an outage."""
RETRIED_4XX = (408, 409, 429)
"""The 4xx statuses the openai client retries (with every 5xx)."""
MODELS_PROBE_TIMEOUT = 10.0
"""Seconds to wait for an endpoint's model list: the check is advisory, a slow list must not hold the run up."""

_current_url: ContextVar[str] = ContextVar("nl_rewrite_endpoint_url")
"""The endpoint the running request was sent to (each request is its own asyncio task, with its own value)."""


class Secret(str):
    """An API key kept to rebuild a backend in another process: the key itself, but never shown by ``repr``."""

    def __repr__(self) -> str:
        return "'***'"


class Rejected(LLMError):
    """The server refused the request (4xx, or a 5xx that says it cannot do this); retrying would not help."""


class EndpointDown(LLMError):
    """No connection to an endpoint, or no answer in time, after the client's retries: it is taken out of rotation."""


@dataclass(frozen=True)
class CallSettings:
    concurrency: int = 8
    """Requests in flight at once on each endpoint."""
    timeout: float = 60.0
    max_retries: int = 4
    """Retries after the first attempt, made by the openai client (its backoff and Retry-After handling)."""
    progress: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.timeout <= 0 or self.max_retries < 0:
            raise ValueError(f"need concurrency >= 1, timeout > 0, max_retries >= 0; got "
                             f"{self.concurrency}, {self.timeout}, {self.max_retries}")


@dataclass
class EndpointStatus:
    """One endpoint's record over the backend's life, for logs and run reports."""

    url: str
    served: int = 0
    """Requests answered here."""
    failures: int = 0
    """Requests that failed here: the outage that took it out of rotation, a refusal, a bad reply."""
    dead: bool = False
    """Out of rotation: its requests go to the other endpoints."""
    reason: str = ""
    """Why it was taken out of rotation."""


class ServerCalls:
    """Calls to one or several server roots (``base_urls``, replicas of one model) through ``AsyncOpenAI`` clients;
    the key is never shown. ``models_path`` (relative to a root) lists the models an endpoint serves: with several
    endpoints, a mismatch between their lists is an ``LLMError`` before the first request."""

    def __init__(self, base_urls: str | Sequence[str], api_key: str, settings: CallSettings,
                 models_path: str = "/models") -> None:
        self.base_urls = endpoint_list(base_urls)
        self.base_url = ",".join(self.base_urls)
        """Every endpoint, for messages that are not about one of them."""
        self._api_key, self.settings, self.models_path = api_key, settings, models_path
        self._endpoints = [EndpointStatus(url) for url in self.base_urls]
        self._models_checked = len(self._endpoints) == 1  # one endpoint has nothing to agree with

    def endpoint_report(self) -> list[EndpointStatus]:
        """A copy of each endpoint's record, in the order the URLs were given."""
        return [replace(endpoint) for endpoint in self._endpoints]

    def url(self) -> str:
        """The endpoint the running request was sent to (inside ``one``), else every URL."""
        return _current_url.get(self.base_url)

    def gather(self, items: Sequence[T], one: Callable[[Any, T], Awaitable[R]], desc: str = "llm",
               sink: Sink | None = None) -> list[R]:
        """``one(client, item)`` for every item, at most ``concurrency`` at a time on each endpoint, results in
        order. ``sink(i, result)`` sees each result as it arrives, so a call that fails later loses none of the
        finished ones. ``one`` may run more than once for an item (again on another endpoint when the first one
        dies under it), but only the answer that completes reaches ``sink`` and the results."""
        return run_sync(self._gather(items, one, desc, sink))

    async def _gather(self, items: Sequence[T], one: Callable[[Any, T], Awaitable[R]], desc: str,
                      sink: Sink | None) -> list[R]:
        from tqdm import tqdm

        self._revive_if_all_dead()
        clients = {endpoint.url: self._client(endpoint.url) for endpoint in self._endpoints}
        try:
            if not self._models_checked:
                await self._check_same_models(clients)
            rotation = Rotation(self._endpoints, self.settings.concurrency, self._all_dead_error)
            with tqdm(total=len(items), desc=desc, unit="req", disable=not self.settings.progress) as bar:
                async def run(index: int, item: T) -> R:
                    out = await self._answer(rotation, clients, one, item)
                    if sink is not None:
                        sink(index, out)
                    bar.update(1)
                    return out
                return await asyncio.gather(*(run(i, item) for i, item in enumerate(items)))
        finally:
            await asyncio.gather(*(client.close() for client in clients.values()))

    def _client(self, url: str) -> Any:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        http = DefaultAsyncHttpxClient(event_hooks={"request": [_count_attempt], "response": [_mark_refusals]})
        return AsyncOpenAI(base_url=url, api_key=self._api_key, timeout=self.settings.timeout,
                           max_retries=self.settings.max_retries, http_client=http)

    async def _answer(self, rotation: Rotation, clients: dict[str, Any], one: Callable[[Any, T], Awaitable[R]],
                      item: T) -> R:
        """``one(client, item)`` on the least-loaded live endpoint; from the start on another one each time the
        endpoint it runs on dies (the rotation raises once none is left)."""
        while True:
            endpoint = await rotation.take()
            _current_url.set(endpoint.url)
            try:
                out = await one(clients[endpoint.url], item)
            except EndpointDown as exc:
                endpoint.failures += 1
                await rotation.remove(endpoint, exc)
                continue
            except Exception:
                endpoint.failures += 1
                raise
            finally:
                await rotation.give_back(endpoint)
            endpoint.served += 1
            return out

    def _revive_if_all_dead(self) -> None:
        """A batch after one that lost every endpoint tries them all again: there is nowhere else to go."""
        if all(endpoint.dead for endpoint in self._endpoints):
            for endpoint in self._endpoints:
                endpoint.dead = False

    def _all_dead_error(self) -> LLMError:
        """One endpoint: its own error, as it always was. Several: every URL with why it was taken out."""
        if len(self._endpoints) == 1:
            return EndpointDown(self._endpoints[0].reason)
        reasons = "; ".join(f"{endpoint.url}: {endpoint.reason}" for endpoint in self._endpoints)
        return LLMError(f"every endpoint is out of rotation ({reasons}); check that the servers are running and "
                        f"reachable, or drop the dead URLs from the list")

    async def _check_same_models(self, clients: dict[str, Any]) -> None:
        """Replicas must serve the same model: compare the model lists of the endpoints that give one."""
        lists = await asyncio.gather(*(self._listed_models(client) for client in clients.values()))
        known = {url: ids for url, ids in zip(clients, lists) if ids is not None}
        if known:
            first_url, first = next(iter(known.items()))
            for url, ids in known.items():
                if ids != first:
                    raise LLMError(f"{url} serves {sorted(ids)} but {first_url} serves {sorted(first)}: several "
                                   f"endpoints must be replicas of one model; list only those that serve it")
        self._models_checked = True

    async def _listed_models(self, client: Any) -> frozenset[str] | None:
        """The model ids an endpoint lists, or ``None`` if it lists none (no such route, or no answer yet: a dead
        endpoint is found by the requests themselves)."""
        import openai

        quick = client.with_options(max_retries=0, timeout=min(self.settings.timeout, MODELS_PROBE_TIMEOUT))
        try:
            page = await quick.get(self.models_path, cast_to=object)
        except (openai.APIError, ValueError):
            return None
        data = page.get("data") if isinstance(page, dict) else None
        ids = [entry.get("id") for entry in data or [] if isinstance(entry, dict)]
        return frozenset(str(i) for i in ids if i) or None

    async def call(self, make: Callable[[], Awaitable[R]]) -> R:
        """One HTTP call, retried by the openai client; :class:`Rejected` when the server refuses it, an
        ``LLMError`` naming the URL and the attempts made when the client gives up."""
        import openai

        failure: LLMError
        sent = ATTEMPTS.set([0])  # counted by the client's request hook, retries included
        try:
            return await make()
        except openai.APIStatusError as exc:
            failure = (self._rejected(exc) if refused(exc.status_code, str(exc.message))
                       else LLMError(self._gave_up(exc)))
        except openai.APIConnectionError as exc:  # APITimeoutError too: the endpoint is unreachable or hung
            failure = EndpointDown(self._gave_up(exc))
        except (json.JSONDecodeError, openai.APIResponseValidationError) as exc:
            failure = LLMError(f"{self.url()} answered with a body that is not valid JSON (garbled or truncated "
                               f"by the server; not retried): {type(exc).__name__}: {short(self._scrub(str(exc)))}")
        finally:
            ATTEMPTS.reset(sent)
        raise failure  # raised outside the handler: the openai error (echoed headers) stays unchained

    def _gave_up(self, exc: Any) -> str:
        counter = ATTEMPTS.get()
        n = counter[0] if counter and counter[0] else self.settings.max_retries + 1
        return (f"no answer from {self.url()} after {n} attempt{'s' if n != 1 else ''}: "
                f"{type(exc).__name__}: {short(self._scrub(str(exc)))}")

    def _rejected(self, exc: Any) -> Rejected:
        return Rejected(f"{self.url()} answered HTTP {exc.status_code}: {short(self._scrub(str(exc.message)))}")

    def _scrub(self, text: str) -> str:
        """A server may echo the request's headers in an error; the key never reaches our messages."""
        return text.replace(self._api_key, "***") if self._api_key and self._api_key != "EMPTY" else text


class Rotation:
    """One batch's view of the endpoints: the requests in flight on each, and a wake-up when a slot frees or an
    endpoint dies. Runs inside one event loop; the records it updates outlive it."""

    def __init__(self, endpoints: list[EndpointStatus], limit: int, all_dead: Callable[[], LLMError]) -> None:
        self.endpoints, self.limit, self.all_dead = endpoints, limit, all_dead
        self.in_flight = {endpoint.url: 0 for endpoint in endpoints}
        self.changed = asyncio.Condition()

    async def take(self) -> EndpointStatus:
        """A slot on the live endpoint with the fewest requests in flight, waiting for one if all are full."""
        async with self.changed:
            while (endpoint := self._least_loaded()) is None:
                await self.changed.wait()
            self.in_flight[endpoint.url] += 1
            return endpoint

    def _least_loaded(self) -> EndpointStatus | None:
        live = [endpoint for endpoint in self.endpoints if not endpoint.dead]
        if not live:
            raise self.all_dead()
        free = [endpoint for endpoint in live if self.in_flight[endpoint.url] < self.limit]
        return min(free, key=lambda endpoint: self.in_flight[endpoint.url], default=None)

    async def give_back(self, endpoint: EndpointStatus) -> None:
        async with self.changed:
            self.in_flight[endpoint.url] -= 1
            self.changed.notify()  # one slot, one waiter: waking them all would cost O(waiting) per answer

    async def remove(self, endpoint: EndpointStatus, error: EndpointDown) -> None:
        """Out of rotation, named once; waiting requests look again (they may have to go elsewhere, or fail)."""
        async with self.changed:
            if not endpoint.dead:
                endpoint.dead, endpoint.reason = True, str(error)
                self._announce(endpoint, error)
            self.changed.notify_all()

    def _announce(self, endpoint: EndpointStatus, error: EndpointDown) -> None:
        live = sum(not e.dead for e in self.endpoints)
        if len(self.endpoints) > 1:  # one endpoint: its error is raised, as it always was
            log.warning("%s is out of rotation (%s); its requests go to the %d other live endpoint%s",
                        endpoint.url, error, live, "" if live == 1 else "s")


def endpoint_list(base_urls: str | Sequence[str]) -> tuple[str, ...]:
    """URLs from a comma-separated string or a sequence, without trailing slashes; each at most once."""
    parts = base_urls.split(",") if isinstance(base_urls, str) else list(base_urls)
    urls = tuple(part.strip().rstrip("/") for part in parts if part.strip())
    if not urls:
        raise ValueError(f"no endpoint URL in {base_urls!r}: give one, or several separated by commas")
    twice = sorted({url for url in urls if urls.count(url) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} listed more than once; to send more requests at once to one "
                         f"server, raise concurrency instead")
    return urls


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


ATTEMPTS: ContextVar[list[int] | None] = ContextVar("nl_rewrite_http_attempts", default=None)
"""Requests sent for the call in progress (each call runs in its own task context, so concurrent calls each
count their own); the error after the client gives up says how many."""


async def _count_attempt(request: Any) -> None:
    """Request hook: one more attempt of the current call (the openai client's retries go through it too)."""
    counter = ATTEMPTS.get()
    if counter is not None:  # None: a request outside :meth:`call`, such as the model-list probe
        counter[0] += 1


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


class HTTPBackend:
    """What the HTTP backends share: their endpoints' report, and pickling as the arguments they were built with
    (a Ray worker that receives one makes its own client). Subclasses set ``calls`` and ``recipe_args``."""

    calls: ServerCalls
    recipe_args: tuple[str | Sequence[str], str | None, Secret, dict[str, Any]]
    """(urls, model, key, keyword options): the key is a :class:`Secret`, so it stays out of repr."""

    def endpoint_report(self) -> list[EndpointStatus]:
        """Per endpoint: requests served and failed, and whether it was taken out of rotation (and why)."""
        return self.calls.endpoint_report()

    def __reduce__(self):
        urls, model, key, options = self.recipe_args
        return (functools.partial(type(self), **options), (urls, model, key))
