"""Small loopback HTTP servers that answer with the documented response schemas of real inference servers,
computed by a real HF causal LM (so their numbers can be compared with the embedded backend's).

- ``vllm``: ``POST /v1/completions`` with ``prompt`` as token ids and ``prompt_logprobs: K``; ``choices[0].
  prompt_logprobs`` is a list with ``None`` for the first token, then ``{token_id: {logprob, rank,
  decoded_token}}`` holding the top-K (ranks 1..K) plus the actual prompt token; ``-inf`` is sent as ``-9999.0``;
  K above ``max_logprobs`` is HTTP 400 with vLLM's message.
- ``sglang``: ``POST /generate`` with ``input_ids``, ``logprob_start_len`` N and ``token_ids_logprob``;
  ``meta_info.input_token_ids_logprobs`` has one entry per token from N on, ``None`` for token N itself, then
  ``[[logprob, token_id, None], ...]`` per requested id.
- ``llamacpp``: ``POST /v1/completions`` with the quirks seen on llama-cpp-python 0.3.36: echoed special tokens
  come back as empty text with offsets that skip them, and ``top_logprobs[j]`` is the distribution *after*
  token j (one off); ``/v1/chat/completions`` closes a trailing assistant message instead of continuing it.
  ``logits_all=False`` answers every logprobs request with HTTP 500 "logprobs is not supported...".

Every loop is bounded: the servers live for one test module and bind 127.0.0.1 only.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from nl_rewrite.llm.server import send_json


class _Handler(BaseHTTPRequestHandler):
    flavor: str
    model: Any
    tokenizer: Any
    max_logprobs: int = 20
    logits_all: bool = True
    lock: threading.Lock
    calls: list[dict[str, Any]]
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append({"path": self.path, **body})
        try:
            with self.lock, torch.inference_mode():
                status, out = self._answer(body)
        except Exception as exc:  # a bug in the fake should show up as an HTTP error, not a hang
            status, out = 500, {"error": {"message": f"fake server: {type(exc).__name__}: {exc}"}}
        send_json(self, status, out)

    def _answer(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.flavor == "sglang" and self.path == "/generate":
            return 200, self._sglang(body)
        if self.flavor == "vllm" and self.path == "/v1/completions":
            return self._vllm(body)
        if self.flavor == "llamacpp" and self.path == "/v1/completions":
            return self._llamacpp_completion(body)
        if self.flavor == "llamacpp" and self.path == "/v1/chat/completions":
            return 200, self._llamacpp_chat(body)
        return 404, {"error": {"message": f"no route {self.path}"}}

    # ---- numerics ---------------------------------------------------------------------------

    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """[pos, vocab]: row p is the distribution of token p+1 given tokens 0..p."""
        return self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    def _generate(self, ids: list[int], max_tokens: int) -> str:
        out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    # ---- vLLM ---------------------------------------------------------------------------------

    def _vllm(self, body: dict[str, Any]) -> tuple[int, Any]:
        k = int(body.get("prompt_logprobs") or 0)
        if k > self.max_logprobs:
            message = f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}"
            return 400, {"object": "error", "message": message, "type": "BadRequestError", "code": 400}
        ids = list(body["prompt"])
        lp = self._logprobs(ids)
        positions: list[Any] = [None]
        for p in range(1, len(ids)):
            row = lp[p - 1]
            order = row.argsort(descending=True)
            wanted = {int(t): r + 1 for r, t in enumerate(order[:k].tolist())}
            actual = ids[p]
            wanted.setdefault(actual, int((row > row[actual]).sum()) + 1)
            positions.append({str(t): {"logprob": max(float(row[t]), -9999.0), "rank": rank,
                                       "decoded_token": self.tokenizer.decode([t])} for t, rank in wanted.items()})
        choice = {"index": 0, "text": self.tokenizer.decode([int(lp[-1].argmax())]), "logprobs": None,
                  "finish_reason": "length", "prompt_logprobs": positions}
        return 200, {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}

    # ---- SGLang -------------------------------------------------------------------------------

    def _sglang(self, body: dict[str, Any]) -> dict[str, Any]:
        if "text" in body:
            ids = self.tokenizer(body["text"], add_special_tokens=False).input_ids
            text = self._generate(ids, int(body["sampling_params"].get("max_new_tokens", 16)))
            return {"text": text, "meta_info": {"prompt_tokens": len(ids)}}
        ids, start, wanted = body["input_ids"], int(body["logprob_start_len"]), body["token_ids_logprob"]
        lp = self._logprobs(ids)
        scored = range(start + 1, len(ids))
        per_id: list[Any] = [None] + [[[float(lp[p - 1, t]), t, None] for t in wanted] for p in scored]
        tokens: list[Any] = [[None, ids[start], None]] + [[float(lp[p - 1, ids[p]]), ids[p], None] for p in scored]
        return {"text": "", "meta_info": {"prompt_tokens": len(ids), "completion_tokens": 0,
                                          "input_token_logprobs": tokens, "input_token_ids_logprobs": per_id}}

    # ---- llama.cpp (llama-cpp-python 0.3.36 quirks) --------------------------------------------

    def _llamacpp_completion(self, body: dict[str, Any]) -> tuple[int, Any]:
        k = body.get("logprobs")
        if k and not self.logits_all:
            return 500, {"error": {"message": "logprobs is not supported for models created with logits_all=False"}}
        prompt = body["prompt"]
        enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc.input_ids
        lp = self._logprobs(ids)
        text = self._generate(ids, int(body.get("max_tokens") or 16))
        choice: dict[str, Any] = {"index": 0, "text": (prompt if body.get("echo") else "") + text,
                                  "logprobs": None, "finish_reason": "length"}
        if k:
            shown = range(len(ids)) if body.get("echo") else range(len(ids) - 1, len(ids))
            special = set(self.tokenizer.all_special_ids)
            tokens, offsets, tops, skipped = [], [], [], 0
            for j in shown:  # one off: entry j holds the distribution AFTER token j
                piece = "" if ids[j] in special else prompt[enc.offset_mapping[j][0]:enc.offset_mapping[j][1]]
                skipped += len(prompt[enc.offset_mapping[j][0]:enc.offset_mapping[j][1]]) if ids[j] in special else 0
                tokens.append(piece)
                offsets.append(enc.offset_mapping[j][0] - skipped)
                tops.append(self._top(lp[j], int(k)))
            if not body.get("echo"):
                tokens, offsets = [text], [0]
            else:
                tokens.append(text)
                offsets.append(len(prompt) - skipped)
                tops.append(self._top(lp[-1], int(k)))
            choice["logprobs"] = {"tokens": tokens, "text_offset": offsets, "top_logprobs": tops,
                                  "token_logprobs": [0.0] * len(tokens)}
        return 200, {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}

    def _top(self, row: torch.Tensor, k: int) -> dict[str, float]:
        values, ids = row.topk(k)
        return {self.tokenizer.decode([int(i)]): float(v) for v, i in zip(values, ids)}

    def _llamacpp_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        # the trailing assistant message is closed like any other turn, then a new one is opened
        prompt = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        text = self._generate(ids, int(body.get("max_tokens") or 16))
        message = {"role": "assistant", "content": text}
        return {"id": "chat-x", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": "length"}]}


def start(flavor: str, model: Any, tokenizer: Any, **settings: Any) -> tuple[ThreadingHTTPServer, list[dict[str, Any]]]:
    """A running server of ``flavor`` on a free loopback port, and the list its request bodies are logged to."""
    calls: list[dict[str, Any]] = []
    handler = type("Handler", (_Handler,), {"flavor": flavor, "model": model, "tokenizer": tokenizer,
                                            "lock": threading.Lock(), "calls": calls, **settings})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


def url(server: ThreadingHTTPServer, path: str = "") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"
