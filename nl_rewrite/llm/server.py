"""The embedded model behind OpenAI's HTTP schema (``nl-rewrite serve``), on the stdlib's ThreadingHTTPServer.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (``prompt``, ``max_tokens``, ``temperature``,
``logprobs``, ``echo``; with ``echo`` and ``logprobs`` the prompt's tokens come back with ``tokens``,
``token_logprobs``, ``top_logprobs`` and ``text_offset``, as OpenAI's legacy API did) and
``POST /v1/chat/completions`` (a trailing assistant message is a prefill that the reply continues).

One request runs the model at a time (the backend's lock); the threads only overlap network I/O.
The prompt is tokenised as a whole, with the model's special start tokens, like vLLM and llama.cpp do.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest
from nl_rewrite.llm.embedded import EmbeddedBackend

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


class _BadRequest(Exception):
    """A request the server refuses with HTTP 400 (the message goes back to the client)."""


def make_server(backend: EmbeddedBackend, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (port 0 picks a free one: read ``server.server_address``)."""
    handler = type("Handler", (_Handler,), {"backend": backend})
    return _Server((host, port), handler)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's default backlog of 5 resets connections when many clients connect at once


class _Handler(BaseHTTPRequestHandler):
    backend: EmbeddedBackend
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # route access logs to logging, not stderr
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": self.backend.model_name, "object": "model", "owned_by": "nl_rewrite"}]})
        else:
            self._send(404, _error(f"no route GET {self.path}"))

    def do_POST(self) -> None:
        routes = {"/v1/completions": completion_response, "/v1/chat/completions": chat_response}
        route = routes.get(self.path.rstrip("/"))
        if route is None:
            self._send(404, _error(f"no route POST {self.path}"))
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            self._send(200, route(self.backend, body))
        except (_BadRequest, LLMError, json.JSONDecodeError, TypeError, ValueError, KeyError) as exc:
            self._send(400, _error(f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # keep serving; tell the client what broke
            log.exception("request failed")
            self._send(500, _error(f"{type(exc).__name__}: {exc}"))

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        send_json(self, status, payload)


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: object) -> None:
    """Answer ``handler``'s request with ``payload`` as JSON (also used by the tests' fake servers)."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error"}}


# ---- /v1/completions ------------------------------------------------------------------------------


def completion_response(backend: EmbeddedBackend, body: dict[str, Any]) -> dict[str, Any]:
    prompts = body.get("prompt", "")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _BadRequest("prompt must be a string or a list of strings")
    settings = _completion_settings(body)
    with backend.exclusive():
        choices = [_complete(backend, p, i, **settings) for i, p in enumerate(prompts)]
    n_prompt = sum(c.pop("_n_prompt") for c in choices)
    n_new = sum(c.pop("_n_new") for c in choices)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": backend.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}


def _completion_settings(body: dict[str, Any]) -> dict[str, Any]:
    top = body.get("logprobs")
    top = None if top is None or top is False else int(top)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _BadRequest(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top}")
    max_tokens = int(body.get("max_tokens") if body.get("max_tokens") is not None else 16)
    if max_tokens < 0:
        raise _BadRequest(f"max_tokens must be >= 0, got {max_tokens}")
    return {"max_tokens": max_tokens, "temperature": float(body.get("temperature") or 0.0),
            "top": top, "echo": bool(body.get("echo", False))}


def _complete(backend: EmbeddedBackend, prompt: str, index: int, *, max_tokens: int, temperature: float,
              top: int | None, echo: bool) -> dict[str, Any]:
    enc = backend.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    prompt_ids = list(enc.input_ids)
    if not prompt_ids:
        raise _BadRequest("the prompt is empty and the model adds no start token")
    new_ids, rows = _generate_with_logprobs(backend, prompt_ids, max_tokens, temperature, seed=index)
    text = backend.tokenizer.decode(new_ids)
    logprobs = None
    if top is not None and (echo or new_ids):
        ids = prompt_ids + new_ids
        offsets = [start for start, _ in enc.offset_mapping] + _generated_offsets(backend, new_ids, len(prompt))
        first = 0 if echo else len(prompt_ids)
        logprobs = _logprob_block(backend, ids, offsets, rows, first, top)
        if not echo:  # offsets count from the start of the returned text, which then excludes the prompt
            logprobs["text_offset"] = [o - len(prompt) for o in logprobs["text_offset"]]
    finish = "stop" if new_ids and new_ids[-1] == backend.tokenizer.eos_token_id else "length"
    return {"index": index, "text": (prompt if echo else "") + text, "logprobs": logprobs, "finish_reason": finish,
            "_n_prompt": len(prompt_ids), "_n_new": len(new_ids)}


def _generate_with_logprobs(backend: EmbeddedBackend, prompt_ids: list[int], max_tokens: int, temperature: float,
                            seed: int) -> tuple[list[int], Float[Tensor, "pos vocab"]]:
    """Greedy or sampled continuation, plus log-prob rows for prompt and continuation from the same passes.

    Row t is log p(token t | tokens before t); row 0 is NaN (nothing predicts the first token).
    """
    generator = torch.Generator().manual_seed(seed)
    logits, cache = backend.forward_cached(torch.tensor([prompt_ids]))
    logits = logits.float()
    rows = [torch.full_like(logits[0], float("nan")), *logits.log_softmax(-1)]
    new_ids: list[int] = []
    for _ in range(max_tokens):
        next_id = _pick(rows[-1], temperature, generator)
        new_ids.append(next_id)
        if next_id == backend.tokenizer.eos_token_id or len(new_ids) == max_tokens:
            break
        step, cache = backend.forward_cached(torch.tensor([[next_id]]), cache)
        rows.append(step[-1].float().log_softmax(-1))
    return new_ids, torch.stack(rows[:len(prompt_ids) + len(new_ids)])


def _pick(logprobs: Float[Tensor, " vocab"], temperature: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logprobs.argmax())
    probs = (logprobs / temperature).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))  # the generator is a CPU one


def _generated_offsets(backend: EmbeddedBackend, new_ids: list[int], start: int) -> list[int]:
    return [start + len(backend.tokenizer.decode(new_ids[:i])) for i in range(len(new_ids))]


def _logprob_block(backend: EmbeddedBackend, ids: list[int], offsets: list[int], logprobs: Tensor, first: int,
                   top: int) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` object for tokens ``first..`` (the first token of all has no log-prob)."""
    block: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in range(first, len(ids)):
        block["tokens"].append(backend.tokenizer.decode([ids[t]]))
        block["text_offset"].append(offsets[t])
        known = t > 0
        block["token_logprobs"].append(float(logprobs[t, ids[t]]) if known else None)
        block["top_logprobs"].append(_top_dict(backend, logprobs[t], top) if known else None)
    return block


def _top_dict(backend: EmbeddedBackend, row: Float[Tensor, " vocab"], top: int) -> dict[str, float]:
    """The ``top`` most likely next tokens as text → log-prob (tokens decoding to the same text keep the best)."""
    values, indices = row.topk(max(top, 1))
    out: dict[str, float] = {}
    for value, index in zip(values.tolist()[:top], indices.tolist()[:top]):
        out.setdefault(backend.tokenizer.decode([index]), value)
    return out


# ---- /v1/chat/completions -------------------------------------------------------------------------


def chat_response(backend: EmbeddedBackend, body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list")
    pairs = [(str(m["role"]), str(m.get("content") or "")) for m in messages]
    prefill = pairs.pop()[1] if pairs[-1][0] == "assistant" and len(pairs) > 1 else ""
    request = ChatRequest(tuple(pairs), max_tokens=int(body.get("max_tokens") or 200),
                          temperature=float(body.get("temperature") or 0.0), prefill=prefill)
    with backend.exclusive():
        prompt_ids = backend.tokenizer(backend.chat_prompt(request), add_special_tokens=False,
                                       return_tensors="pt").input_ids
        new_ids = backend.generate(prompt_ids, request.max_tokens, request.temperature,
                                   seed=int(request.key()[:8], 16))
    text = backend.tokenizer.decode(new_ids, skip_special_tokens=True)
    finish = "stop" if new_ids and new_ids[-1] == backend.tokenizer.eos_token_id else "length"
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": backend.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_ids.shape[1], "completion_tokens": len(new_ids),
                      "total_tokens": prompt_ids.shape[1] + len(new_ids)}}
