"""The ``LLMBackend`` protocol over an OpenAI-compatible HTTP server (vLLM, llama.cpp, OpenRouter, nl-rewrite serve).

Settings come from the arguments, else the environment: ``NL_REWRITE_BASE_URL`` (else ``OPENAI_BASE_URL``),
``NL_REWRITE_MODEL``, ``OPENAI_API_KEY``, ``NL_REWRITE_CHAT_TEMPLATE``, ``NL_REWRITE_SCORE_MODE`` (so the command
line, whose ``--llm`` spec names only model and URL, can choose them). The key is never logged and never in
``repr`` or ``backend_id``.

**Several endpoints.** ``base_url`` (or ``NL_REWRITE_BASE_URL``) may list replicas of one model, comma-separated
or as a sequence: ``concurrency`` then applies to each, every request goes to the live endpoint with the fewest
in flight, and one that stops answering (connection refused or reset, or a timeout, after the client's retries) is
taken out of rotation with a warning while its requests run again on the others (:mod:`.http_calls`).
``endpoint_report()`` gives per URL the requests served and failed and whether it is out. The endpoints' model
lists (``/v1/models``) must agree. ``backend_id`` names the model, not the URLs, so one cache serves any list of
replicas. The probes below run once, on the first live endpoint; every replica is assumed to answer alike.

**The model's own chat template** (:mod:`.templates`) renders every prompt, so a simulator request is the same
text here as in the embedded backend. It comes from ``chat_template`` (an embedded model name, a HF directory or
a ``.gguf``), the environment, or the served model's name when that is a local path (llama.cpp names a model by
its GGUF path). Simulating without one is an ``LLMError`` that says how to pass it.

**Chat.** With a template, a chat is rendered locally and sent to ``/v1/completions``: the prefill is then
continued exactly, on any server. Without one it goes to ``/v1/chat/completions`` with the prefill as a trailing
assistant message. Whether the server continues that message is settled once (``prefill_mode="auto"``) with a
probe whose continuation is known ("One, two, three, four," → " five"): if it does not (llama.cpp closes the
turn; vLLM needs ``prefill_mode="vllm"``), each reply is merged with the prefill where they overlap.

**Score**, ``score_mode``:
- ``"echo"``: one completions call per request with ``echo=True, logprobs=K, max_tokens=1``; the distribution
  after a read point is the ``top_logprobs`` of the echoed token that starts there. Refused (an ``LLMError``)
  when the alignment probe below fails.
- ``"per_read"``: one call per read point on the prompt cut there, reading the generated token's distribution.
  Right on every server, at n_read calls per request.
- ``"prompt_logprobs"`` (vLLM): the prompt is tokenised locally with the template's tokenizer (prefix, then each
  segment alone: see :mod:`.token_layout`) and sent as token ids with ``prompt_logprobs=K``; results come from
  ``choices[0].prompt_logprobs``. A read point whose choices are not all in the top-K is retried once with
  ``K = max_logprobs``, then left NaN and counted.
- ``"auto"`` (default): echo only if a probe proves the server's echo is aligned (its echoed tokens spell the
  prompt, its offsets count every character, and its log-probs at three token starts equal those of a
  completion cut there); otherwise ``per_read``, said once in the log. In ``auto``, a read point that falls
  inside a server token is read per-read for that request (counted), never at the wrong token.

A choice missing from a top-K list is ``-inf`` only when provably negligible, else the row is NaN
(:mod:`.readout`). A server that returns no logprobs at all is an ``LLMError``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest, Counts, ScoreRequest
from nl_rewrite.llm.http_calls import CallSettings, HTTPBackend, Rejected, Secret, ServerCalls, Sink, short
from nl_rewrite.llm.readout import choice_matrix, choice_row, topk_floor
from nl_rewrite.llm.templates import HOW_TO_PASS, ChatTemplate, find_template
from nl_rewrite.llm.token_layout import layout

log = logging.getLogger(__name__)

SCORE_MODES = ("auto", "echo", "per_read", "prompt_logprobs")
PREFILL_MODES = ("auto", "assistant", "vllm", "merge")
PROBE_CHAT = ChatRequest((("user", "Count from one to ten in words, separated by commas."),), max_tokens=3,
                         prefill="One, two, three, four,")
"""Its continuation is known (" five"), so it tells whether a server continues a prefill and reads echo right."""
REPEAT_TOLERANCE = 0.05
"""Log-prob change (nat) between two identical requests above which a server counts as non-reproducible."""
VLLM_NEG_INF = -9999.0
"""vLLM sends a ``-inf`` prompt logprob as this number."""


@dataclass
class ServerReport(Counts):
    """What the backend had to work around, for logs and run reports."""

    echo_fallbacks: int = 0
    """Requests read per-read because a read point fell inside one of the server's tokens."""
    unknown_reads: int = 0
    """Read points left NaN: some choices missing from the top-K and not provably negligible."""
    raised_k: int = 0
    """Requests re-sent with ``max_logprobs`` because the first top-K missed some choices."""
    repeat_max_diff: float = 0.0
    """Largest log-prob change when one read point was asked twice (0 on a deterministic server)."""
    prefills_merged: int = 0
    prefills_unmatched: int = 0
    """Replies from a server that does not continue prefills, with no overlap to merge on."""


class OpenAIBackend(HTTPBackend):
    """Chat and score requests against ``base_url``: an OpenAI-compatible ``/v1`` root, or several (replicas)."""

    def __init__(self, base_url: str | Sequence[str] | None = None, model: str | None = None,
                 api_key: str | None = None, *, chat_template: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 4, top_logprobs: int = 20, max_logprobs: int = 20,
                 score_mode: str | None = None, prefill_mode: str = "auto", check_repeat: bool = True,
                 progress: bool = False) -> None:
        urls = (base_url or os.environ.get("NL_REWRITE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                or "https://api.openai.com/v1")
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers need none
        self.calls = ServerCalls(urls, key, CallSettings(concurrency, timeout, max_retries, progress))
        self.base_url = self.calls.base_url
        """The endpoint, or every endpoint separated by commas."""
        self.model = model or os.environ.get("NL_REWRITE_MODEL")
        if not self.model:
            raise LLMError(f"no model for {self.base_url}: pass model= or set NL_REWRITE_MODEL")
        score_mode = score_mode or os.environ.get("NL_REWRITE_SCORE_MODE") or "auto"
        _check_modes(top_logprobs, max_logprobs, score_mode, prefill_mode)
        self.top_logprobs, self.max_logprobs = top_logprobs, max(max_logprobs, top_logprobs)
        self.requested_score_mode = score_mode
        self.score_mode, self.prefill_mode = score_mode, prefill_mode
        """In use: ``auto`` and ``prefill_mode="auto"`` are replaced by what the first probe settles."""
        self.echo_checked = False
        self.check_repeat = check_repeat
        """Ask one read point twice on the first score call and warn if the answers differ (vllm #42019)."""
        self._settling = threading.Lock()  # one probe at a time when several threads share the backend
        self.template: ChatTemplate | None = find_template(chat_template, self.model)
        self.report = ServerReport()
        # the template decides the chat route and every prompt's text, so it is part of the cache key; the URLs are
        # not: replicas of one model give the same answers, whichever of them and however many are listed
        via = f"|template={self.template.source}" if self.template is not None else ""
        self.backend_id = f"openai:{self.model}{via}"
        self.recipe_args = (urls, self.model, Secret(key), dict(
            chat_template=chat_template, concurrency=concurrency, timeout=timeout, max_retries=max_retries,
            top_logprobs=top_logprobs, max_logprobs=max_logprobs, score_mode=score_mode, prefill_mode=prefill_mode,
            check_repeat=check_repeat, progress=progress))

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, score_mode={self.score_mode!r})"

    def chat_prompt(self, request: ChatRequest) -> str:
        """The request in the model's own chat template; an ``LLMError`` saying how to pass one if unknown."""
        if self.template is None:
            raise LLMError(f"no chat template for {self.model!r} at {self.base_url}: prompts must be rendered with "
                           f"the model's own template to match the embedded backend; {HOW_TO_PASS}")
        return self.template.render(request)

    # ---- chat ---------------------------------------------------------------------------------

    streams_answers = True
    """``chat`` and ``score`` take a ``sink`` that sees each answer as it arrives (``CachedBackend`` stores it)."""

    def chat(self, requests: Sequence[ChatRequest], sink: Sink | None = None) -> list[str]:
        if self.template is not None:
            return self.calls.gather(requests, self._chat_templated, "chat", sink)
        if self.prefill_mode == "auto" and any(r.prefill for r in requests):
            self._settle_prefill()
        return self.calls.gather(requests, self._chat_endpoint, "chat", sink)

    async def _chat_templated(self, client: Any, request: ChatRequest) -> str:
        prompt = self.chat_prompt(request)
        response = await self.calls.call(lambda: client.completions.create(
            model=self.model, prompt=prompt, max_tokens=request.max_tokens, temperature=request.temperature))
        return _first_choice(response, self.calls.url()).text or ""

    async def _chat_endpoint(self, client: Any, request: ChatRequest) -> str:
        messages = [{"role": role, "content": content} for role, content in request.messages]
        extra: dict[str, Any] = {}
        if request.prefill:
            messages.append({"role": "assistant", "content": request.prefill})
            if self.prefill_mode == "vllm":
                extra = {"continue_final_message": True, "add_generation_prompt": False}
        response = await self.calls.call(lambda: client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=request.max_tokens,
            temperature=request.temperature, extra_body=extra or None))
        text = _first_choice(response, self.calls.url()).message.content or ""
        return self._after_prefill(request.prefill, text)

    def _after_prefill(self, prefill: str, text: str) -> str:
        """The reply without the prefill: stripped if repeated, merged on overlap if the server restarted."""
        if not prefill:
            return text
        if self.prefill_mode != "merge":
            return text[len(prefill):] if text.startswith(prefill) else text
        merged = merge_prefill(prefill, text)
        if merged is None:
            self.report.prefills_unmatched += 1
            return "\n" + text
        self.report.prefills_merged += 1
        return merged

    def _settle_prefill(self) -> None:
        with self._settling:
            if self.prefill_mode != "auto":
                return
            reply = self.calls.gather([PROBE_CHAT], self._probe_chat, "probe")[0]
            continued = reply.strip().lower().startswith("five")
            if not continued:
                log.info("%s does not continue an assistant prefill (probe reply %r); replies are merged with the "
                         "prefill where they overlap", self.base_url, short(reply, 60))
            self.prefill_mode = "assistant" if continued else "merge"

    async def _probe_chat(self, client: Any, request: ChatRequest) -> str:
        messages = [{"role": role, "content": content} for role, content in request.messages]
        messages.append({"role": "assistant", "content": request.prefill})
        response = await self.calls.call(lambda: client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=request.max_tokens, temperature=0.0))
        return _first_choice(response, self.calls.url()).message.content or ""

    # ---- score --------------------------------------------------------------------------------

    def score(self, requests: Sequence[ScoreRequest], sink: Sink | None = None
              ) -> list[Float[Tensor, "n_read n_choices"]]:
        if not requests:
            return []
        if self.requested_score_mode in ("auto", "echo") and not self.echo_checked:
            self._check_echo()
        one = {"echo": self._score_echo, "per_read": self._score_per_read,
               "prompt_logprobs": self._score_prompt_logprobs}[self.score_mode]
        before = self.report.snapshot()
        out = self.calls.gather(requests, one, "score", sink)
        changed = self.report.since(before)
        if changed:
            log.info("%s: %s over %d score requests", self.base_url, changed, len(requests))
        if self.check_repeat:
            self._check_repeat(requests[0], out[0], one)
        return out

    def _check_repeat(self, request: ScoreRequest, first: Tensor, one: Any) -> None:
        """Send the first read point of ``request`` again: a server whose scores change between identical
        requests (vLLM with prefix caching and prompt log-probs, vllm #42019) is named once in a warning."""
        self.check_repeat = False
        if not request.read_after:
            return
        counts = self.report.snapshot()  # the check's own request is not part of the run's counts
        try:
            again = self.calls.gather([replace(request, read_after=request.read_after[:1])], one, "repeat")[0][0]
        except LLMError as exc:  # the check is advisory: the scores already came back
            log.warning("could not repeat a score request to check %s is reproducible: %s", self.base_url, exc)
            return
        finally:
            self.report.restore(counts)
        both = torch.isfinite(again) & torch.isfinite(first[0])
        diff = float((again - first[0])[both].abs().max()) if both.any() else 0.0
        self.report.repeat_max_diff = diff
        if diff > REPEAT_TOLERANCE or not torch.equal(torch.isnan(again), torch.isnan(first[0])):
            log.warning("%s gave different log-probs for the same request twice (max change %.3g nat): its scores "
                        "are not reproducible; with vLLM, turn prefix caching off or use score_mode='per_read' "
                        "(vllm #42019)", self.base_url, diff)

    def _check_echo(self) -> None:
        """Probe echo once: ``auto`` settles on echo or per_read; an explicit ``echo`` refuses a misaligned server."""
        with self._settling:
            if self.echo_checked:
                return
            problem = self.calls.gather([self._probe_prompt()], self._echo_problem, "probe")[0]
            if problem and self.requested_score_mode == "echo":
                raise LLMError(f"score_mode='echo' would read the wrong tokens on {self.base_url}: {problem}; use "
                               "score_mode='auto' or 'per_read'")
            if problem:
                log.info("not using echo on %s: %s; scoring one call per read point", self.base_url, problem)
            self.score_mode = "per_read" if problem else "echo"
            self.echo_checked = True

    def _probe_prompt(self) -> str:
        if self.template is not None:
            return self.template.render(PROBE_CHAT)
        return f"{PROBE_CHAT.messages[0][1]}\n{PROBE_CHAT.prefill}"

    async def _echo_problem(self, client: Any, prompt: str) -> str | None:
        """Why echo cannot be trusted on this server, or ``None`` when the probe shows it aligned."""
        try:
            data = _logprobs_or_none(await self._completion(client, prompt, echo=True, k=5))
        except Rejected as exc:
            return f"it refused echo ({exc})"
        if data is None:
            return "it returned no log-probs with echo"
        problem = _spelling_problem(data.get("tokens") or [], data.get("text_offset") or [], prompt)
        if problem:
            return problem
        starts = [j for j, o in enumerate(data["text_offset"]) if 0 < o < len(prompt)][-3:]
        for j in starts:
            cut = await self._completion(client, prompt[:data["text_offset"][j]], echo=False, k=5)
            if not _same_top(_top_at(data, j), _top_at(_logprobs_of(cut, self.calls.url()), 0)):
                return (f"its echoed log-probs at token {j} ({data['tokens'][j]!r}) differ from those of a "
                        "completion cut there (echo reads the distribution of another position)")
        return None

    async def _score_echo(self, client: Any, request: ScoreRequest) -> Tensor:
        """Echo, checked on every reply: its tokens must spell this prompt (a server that drops characters, say
        of a multi-byte character split across tokens, shifts every later offset) and each read point must start
        a token. Where either fails, ``auto`` reads that request per-read (counted) and ``echo`` refuses."""
        data = _logprobs_of(await self._completion(client, request.prompt, echo=True, k=self.top_logprobs),
                            self.calls.url())
        problem = _spelling_problem(data.get("tokens") or [], data.get("text_offset") or [], request.prompt)
        indices = [] if problem else [_token_starting_at(data["text_offset"], end) for end in _read_offsets(request)]
        if problem or None in indices:
            if self.requested_score_mode == "echo":
                raise LLMError(f"{self.calls.url()}: {problem}" if problem else
                               _inside_token_message(data, request, indices))
            self.report.echo_fallbacks += 1
            return await self._score_per_read(client, request)
        return self._rows([_top_at(data, j) for j in indices], request.choices)

    async def _score_per_read(self, client: Any, request: ScoreRequest) -> Tensor:
        tops = []
        for end in _read_offsets(request):  # sequential within a request: shares the server's prefix cache
            if end == 0:
                raise LLMError("a read point falls before the first token: the prompt is empty up to there")
            response = await self._completion(client, request.prompt[:end], echo=False, k=self.top_logprobs)
            tops.append(_top_at(_logprobs_of(response, self.calls.url()), 0))
        return self._rows(tops, request.choices)

    def _rows(self, tops: list[dict[str, float]], choices: Sequence[str]) -> Tensor:
        rows = [choice_row(top, choices, topk_floor(top, self.top_logprobs)) for top in tops]
        self.report.unknown_reads += sum(1 for r in rows if math.isnan(r[0]))
        return choice_matrix(rows, len(choices))

    async def _completion(self, client: Any, prompt: str, echo: bool, k: int) -> Any:
        return await self.calls.call(lambda: client.completions.create(
            model=self.model, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=k, echo=echo))

    # ---- vLLM prompt_logprobs -----------------------------------------------------------------

    async def _score_prompt_logprobs(self, client: Any, request: ScoreRequest) -> Tensor:
        if self.template is None:
            raise LLMError(f"score_mode='prompt_logprobs' tokenises prompts locally and needs the model's "
                           f"tokenizer; {HOW_TO_PASS}")
        lay = layout(request, self.template.encode_prefix, self.template.encode_segment)
        if min(lay.reads, default=0) < 0:
            raise LLMError("a read point falls before the first token: the prompt is empty up to there")
        choice_ids = self.template.choice_ids(request.choices)
        ids = list(lay.ids) + choice_ids[:1]  # one more token, so the last read point has a scored position
        rows = await self._prompt_logprob_rows(client, ids, lay.reads, choice_ids, self.top_logprobs)
        if any(math.isnan(r[0]) for r in rows) and self.max_logprobs > self.top_logprobs:
            self.report.raised_k += 1
            rows = await self._prompt_logprob_rows(client, ids, lay.reads, choice_ids, self.max_logprobs)
        self.report.unknown_reads += sum(1 for r in rows if math.isnan(r[0]))
        return choice_matrix(rows, len(request.choices))

    async def _prompt_logprob_rows(self, client: Any, ids: list[int], reads: Sequence[int], choice_ids: list[int],
                                   k: int) -> list[list[float]]:
        response = await self.calls.call(lambda: client.completions.create(
            model=self.model, prompt=ids, max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": k}))
        positions = getattr(_first_choice(response, self.calls.url()), "prompt_logprobs", None)
        if not positions or len(positions) != len(ids):
            raise LLMError(f"{self.calls.url()} returned {len(positions or [])} prompt_logprobs for {len(ids)} prompt "
                           "tokens; is this a vLLM server? (other servers: score_mode='echo' or 'per_read')")
        return [_vllm_row(positions[r + 1], choice_ids, k) for r in reads]


def merge_prefill(prefill: str, reply: str) -> str | None:
    """The part of ``reply`` that continues ``prefill``, for a server that restarted the answer instead of
    continuing it: after the prefill if the reply repeats it, else after the longest overlap of the prefill's
    tail (at least two words: one common word is no evidence) with the reply's start; ``None`` otherwise."""
    if prefill in reply:
        return reply.split(prefill, 1)[1]
    stripped = reply.lstrip()
    words = prefill.split(" ")
    for cut in range(len(words) - 1):
        tail = " ".join(words[cut:]).strip()
        if tail and stripped.startswith(tail):
            return stripped[len(tail):]
    return None


def _check_modes(top_logprobs: int, max_logprobs: int, score_mode: str, prefill_mode: str) -> None:
    if top_logprobs < 1 or max_logprobs < 1:
        raise ValueError(f"top_logprobs and max_logprobs must be >= 1, got {top_logprobs}, {max_logprobs}")
    if score_mode not in SCORE_MODES or prefill_mode not in PREFILL_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES} and prefill_mode one of {PREFILL_MODES}; "
                         f"got {score_mode!r}, {prefill_mode!r}")


def _first_choice(response: Any, base_url: str) -> Any:
    if not getattr(response, "choices", None):
        raise LLMError(f"{base_url} returned no choices")
    return response.choices[0]


def _read_offsets(request: ScoreRequest) -> list[int]:
    """Character offset in the prompt of each read point (the end of its segment)."""
    ends, at = [], len(request.prefix)
    for segment in request.segments:
        at += len(segment)
        ends.append(at)
    return [ends[i] for i in request.read_after]


def _logprobs_or_none(response: Any) -> dict[str, Any] | None:
    choices = getattr(response, "choices", None) or []
    logprobs = choices[0].logprobs if choices else None
    data = logprobs.model_dump() if hasattr(logprobs, "model_dump") else logprobs
    return data if data and data.get("top_logprobs") else None


def _logprobs_of(response: Any, base_url: str) -> dict[str, Any]:
    """The first choice's ``logprobs`` as a dict; an ``LLMError`` if the server sent none."""
    data = _logprobs_or_none(response)
    if data is None:
        raise LLMError(f"{base_url} returned no logprobs for a completions request with logprobs set; this server "
                       "cannot score (llama.cpp needs --logits_all; some hosted models do not return logprobs)")
    return data


def _spelling_problem(tokens: list[str], offsets: list[int], prompt: str) -> str | None:
    """Why the echoed tokens and offsets do not lay out ``prompt`` character for character, if they don't."""
    n = sum(1 for o in offsets if o < len(prompt))
    if len(tokens) < 2 or len(offsets) != len(tokens):
        return "it echoed no prompt tokens"
    if "".join(tokens[:n]) != prompt:
        return "its echoed tokens do not spell the prompt (special tokens dropped or changed)"
    at = 0
    for j in range(n):
        if offsets[j] != at:
            return f"its text_offset of token {j} is {offsets[j]}, not {at} (offsets skip characters)"
        at += len(tokens[j])
    return None


def _same_top(a: dict[str, float], b: dict[str, float], tolerance: float = 0.3) -> bool:
    """Same most likely token, with log-probs within ``tolerance`` (servers batch differently)."""
    if not a or not b:
        return False
    best = max(a, key=a.__getitem__)
    return best == max(b, key=b.__getitem__) and abs(a[best] - b[best]) <= tolerance


def _token_starting_at(offsets: list[int], offset: int) -> int | None:
    """Index of the echoed token that starts at character ``offset`` (the last, if empty tokens share it)."""
    hits = [j for j, o in enumerate(offsets) if o == offset]
    return hits[-1] if hits else None


def _inside_token_message(data: dict[str, Any], request: ScoreRequest, indices: list[int | None]) -> str:
    offset = _read_offsets(request)[indices.index(None)]
    inside = max((j for j, o in enumerate(data["text_offset"]) if o < offset), default=0)
    return (f"read point at character {offset} falls inside the server's token {data['tokens'][inside]!r} (its "
            f"tokeniser merges across the segment boundary); use score_mode='auto' or 'per_read', which read such "
            f"points one call at a time (context: {request.prompt[max(0, offset - 20):offset]!r})")


def _top_at(logprobs: dict[str, Any], index: int) -> dict[str, float]:
    tops = logprobs["top_logprobs"]
    if index >= len(tops) or tops[index] is None:
        raise LLMError(f"the server gave no top_logprobs at token {index}")
    return tops[index]


def _vllm_row(position: dict[str, Any] | None, choice_ids: list[int], k: int) -> list[float]:
    """One read point from a vLLM ``prompt_logprobs`` entry (token id → {logprob, rank, decoded_token})."""
    if position is None:
        raise LLMError("vLLM returned no prompt_logprobs at a read point (only the first token should have none)")
    entries = {int(t): e for t, e in position.items()}
    top = {str(t): -math.inf if float(e["logprob"]) <= VLLM_NEG_INF else float(e["logprob"])
           for t, e in entries.items()}
    ranked = {t: v for t, v in top.items() if (entries[int(t)].get("rank") or 1) <= k}
    return choice_row(top, [str(i) for i in choice_ids], topk_floor(ranked, k))
