"""The ``LLMBackend`` protocol over an OpenAI-compatible HTTP server (vLLM, llama.cpp, OpenRouter, ``nl-rewrite serve``).

Settings come from the arguments, else the environment: ``NL_REWRITE_BASE_URL`` (else ``OPENAI_BASE_URL``),
``NL_REWRITE_MODEL``, ``OPENAI_API_KEY``. The key is never logged and never in ``repr`` or ``backend_id``.

Requests run concurrently (``AsyncOpenAI`` + a semaphore) behind synchronous methods; connection errors,
timeouts, 429 and 5xx are retried with exponential backoff; anything else is an ``LLMError`` at once.

Chat: ``prefill`` is sent as a trailing assistant message (OpenRouter/Anthropic-style servers, llama.cpp and
``nl-rewrite serve`` continue it; vLLM needs ``prefill_mode="vllm"``, which adds ``continue_final_message``).
A reply that repeats the prefill has it stripped.

Score, ``score_mode``:
- ``"echo"``: one completions call per request with ``echo=True, logprobs=K, max_tokens=1``. The server returns
  the prompt's tokens with ``text_offset`` and ``top_logprobs``; the distribution after a read point is the
  ``top_logprobs`` of the token that starts there (or of the generated token, for a read point at the very
  end). A read point must fall on a token boundary of the server's tokenisation: end segments with whitespace
  or punctuation (e.g. ``"cat\\t"``) so no token spans it.
- ``"per_read"``: one completions call per read point, on the prompt cut at that point, reading the generated
  token's ``top_logprobs``. Works on servers without ``echo`` (llama.cpp's own server, OpenRouter), at
  n_read calls per request (servers with prefix caching make the repeats cheap).
- ``"auto"`` (default): ``echo`` if the first request shows the server honours it, else ``per_read``.

A choice missing from the top-K is ``-inf``. A server that returns no logprobs at all is an ``LLMError``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from typing import Any, Awaitable, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import LLMError
from .base import ChatRequest, ScoreRequest

log = logging.getLogger(__name__)

SCORE_MODES = ("auto", "echo", "per_read")
PREFILL_MODES = ("assistant", "vllm")


class _Rejected(LLMError):
    """The server answered with a non-retryable HTTP error (kept apart so ``auto`` can fall back)."""


class OpenAIBackend:
    """Chat and score requests against ``base_url`` (an OpenAI-compatible ``/v1`` root)."""

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 concurrency: int = 8, timeout: float = 60, max_retries: int = 4, backoff: float = 1.0,
                 top_logprobs: int = 20, score_mode: str = "auto", prefill_mode: str = "assistant",
                 progress: bool = False) -> None:
        self.base_url = (base_url or os.environ.get("NL_REWRITE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or "https://api.openai.com/v1").rstrip("/")
        self.model = model or os.environ.get("NL_REWRITE_MODEL")
        if not self.model:
            raise LLMError(f"no model for {self.base_url}: pass model= or set NL_REWRITE_MODEL")
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers need none
        _check_settings(concurrency, timeout, max_retries, top_logprobs, score_mode, prefill_mode)
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.top_logprobs, self.score_mode, self.prefill_mode = top_logprobs, score_mode, prefill_mode
        self.progress = progress
        self.backend_id = f"openai:{self.model}@{self.base_url}"

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, score_mode={self.score_mode!r})"

    # ---- plumbing -----------------------------------------------------------------------------

    def _gather(self, requests: Sequence[Any], one: Callable[[Any, Any], Awaitable[Any]]) -> list[Any]:
        """Run ``one(client, request)`` for every request, at most ``concurrency`` at a time."""
        from openai import AsyncOpenAI
        from tqdm import tqdm

        async def main() -> list[Any]:
            client = AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0)
            gate = asyncio.Semaphore(self.concurrency)
            with tqdm(total=len(requests), desc="llm", unit="req", disable=not self.progress) as bar:
                async def run(r: Any) -> Any:
                    async with gate:
                        out = await one(client, r)
                    bar.update(1)
                    return out
                try:
                    return await asyncio.gather(*(run(r) for r in requests))
                finally:
                    await client.close()

        return _run_sync(main())

    async def _call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """One HTTP call with retries and backoff; an ``LLMError`` naming the URL when it gives up."""
        import openai

        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                return await make()
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
                last = exc
                if attempt < self.max_retries:
                    await asyncio.sleep(self.backoff * 2 ** attempt * (1 + 0.25 * random.random()))
            except openai.APIStatusError as exc:
                raise _Rejected(f"{self.base_url} answered HTTP {exc.status_code}: {_short(exc.message)}") from exc
        raise LLMError(f"no answer from {self.base_url} after {self.max_retries + 1} attempts: "
                       f"{type(last).__name__}: {_short(str(last))}") from last

    # ---- chat ---------------------------------------------------------------------------------

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        return self._gather(requests, self._chat_one)

    async def _chat_one(self, client: Any, request: ChatRequest) -> str:
        messages = [{"role": role, "content": content} for role, content in request.messages]
        extra: dict[str, Any] = {}
        if request.prefill:
            messages.append({"role": "assistant", "content": request.prefill})
            if self.prefill_mode == "vllm":
                extra = {"continue_final_message": True, "add_generation_prompt": False}
        response = await self._call(lambda: client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=request.max_tokens,
            temperature=request.temperature, extra_body=extra or None))
        if not response.choices:
            raise LLMError(f"{self.base_url} returned no choices for a chat request")
        text = response.choices[0].message.content or ""
        return text[len(request.prefill):] if request.prefill and text.startswith(request.prefill) else text

    # ---- score --------------------------------------------------------------------------------

    def score(self, requests: Sequence[ScoreRequest]) -> list[Float[Tensor, "n_read n_choices"]]:
        if not requests:
            return []
        first: list[Tensor] = []
        if self.score_mode == "auto":
            first = [self._detect_mode(requests[0])]
        rest = requests[len(first):]
        one = self._score_echo if self.score_mode == "echo" else self._score_per_read
        return first + self._gather(rest, one)

    def _detect_mode(self, request: ScoreRequest) -> Tensor:
        """Settle ``auto`` on the first request: echo if the server returns prompt logprobs, else per_read."""
        try:
            out = self._gather([request], self._score_echo)[0]
            self.score_mode = "echo"
        except _NoEcho as exc:
            log.info("%s does not echo prompt logprobs (%s); scoring one call per read point", self.base_url, exc)
            out = self._gather([request], self._score_per_read)[0]
            self.score_mode = "per_read"
        return out

    async def _score_echo(self, client: Any, request: ScoreRequest) -> Tensor:
        prompt = request.prompt
        try:
            response = await self._completion(client, prompt, echo=True)
        except _Rejected as exc:
            raise _NoEcho(str(exc)) from exc
        logprobs = _logprobs_of(response, self.base_url)
        if len(logprobs.get("tokens") or []) <= 1 or not logprobs.get("text_offset"):
            raise _NoEcho("the reply holds no prompt tokens")
        tops = [_top_at(logprobs, _token_starting_at(logprobs, prompt, end)) for end in _read_offsets(request)]
        return _choice_matrix(tops, request.choices)

    async def _score_per_read(self, client: Any, request: ScoreRequest) -> Tensor:
        tops = []
        for end in _read_offsets(request):  # sequential within a request: shares the server's prefix cache
            if end == 0:
                raise LLMError("a read point falls before the first token: the prompt is empty up to there")
            response = await self._completion(client, request.prompt[:end], echo=False)
            tops.append(_top_at(_logprobs_of(response, self.base_url), 0))
        return _choice_matrix(tops, request.choices)

    async def _completion(self, client: Any, prompt: str, echo: bool) -> Any:
        return await self._call(lambda: client.completions.create(
            model=self.model, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=self.top_logprobs, echo=echo))


class _NoEcho(LLMError):
    """The server ignored or refused ``echo`` with logprobs."""


def _check_settings(concurrency: int, timeout: float, max_retries: int, top_logprobs: int, score_mode: str,
                    prefill_mode: str) -> None:
    if concurrency < 1 or timeout <= 0 or max_retries < 0 or top_logprobs < 1:
        raise ValueError(f"need concurrency >= 1, timeout > 0, max_retries >= 0, top_logprobs >= 1; got "
                         f"{concurrency}, {timeout}, {max_retries}, {top_logprobs}")
    if score_mode not in SCORE_MODES or prefill_mode not in PREFILL_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES} and prefill_mode one of {PREFILL_MODES}; "
                         f"got {score_mode!r}, {prefill_mode!r}")


def _read_offsets(request: ScoreRequest) -> list[int]:
    """Character offset in the prompt of each read point (the end of its segment)."""
    ends, at = [], len(request.prefix)
    for segment in request.segments:
        at += len(segment)
        ends.append(at)
    return [ends[i] for i in request.read_after]


def _logprobs_of(response: Any, base_url: str) -> dict[str, Any]:
    """The first choice's ``logprobs`` as a dict; an ``LLMError`` if the server sent none."""
    choices = getattr(response, "choices", None) or []
    logprobs = choices[0].logprobs if choices else None
    data = logprobs.model_dump() if hasattr(logprobs, "model_dump") else logprobs
    if not data or not data.get("top_logprobs"):
        raise LLMError(f"{base_url} returned no logprobs for a completions request with logprobs set; this server "
                       "cannot score (llama.cpp needs --logits_all; some hosted models do not return logprobs)")
    return data


def _token_starting_at(logprobs: dict[str, Any], prompt: str, offset: int) -> int:
    """Index of the echoed token that starts at character ``offset`` (the last, if empty tokens share it)."""
    offsets = logprobs["text_offset"]
    hits = [j for j, o in enumerate(offsets) if o == offset]
    if not hits:
        inside = max((j for j, o in enumerate(offsets) if o < offset), default=None)
        piece = logprobs["tokens"][inside] if inside is not None else "?"
        raise LLMError(f"read point at character {offset} falls inside the server's token {piece!r}; end the "
                       f"segment with whitespace or punctuation, or use score_mode='per_read' "
                       f"(context: {prompt[max(0, offset - 20):offset]!r})")
    return hits[-1]


def _top_at(logprobs: dict[str, Any], index: int) -> dict[str, float]:
    tops = logprobs["top_logprobs"]
    if index >= len(tops) or tops[index] is None:
        raise LLMError(f"the server gave no top_logprobs at token {index}")
    return tops[index]


def _choice_matrix(tops: list[dict[str, float]], choices: Sequence[str]) -> Float[Tensor, "n_read n_choices"]:
    """Log-probs of each choice at each read point; ``-inf`` where a choice is outside the top-K."""
    rows = [[float(top.get(c, float("-inf"))) for c in choices] for top in tops]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(tops), len(choices))


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _run_sync(coro: Awaitable[Any]) -> Any:
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
