"""The ``LLMBackend`` protocol over SGLang's native ``POST /generate`` (https://docs.sglang.ai/).

Score: the prompt is tokenised locally with the model's own tokenizer (:mod:`.templates`, :mod:`.token_layout`)
and sent as ``input_ids`` with

- ``sampling_params.max_new_tokens = 0`` (prefill only),
- ``return_logprob = true`` and ``logprob_start_len`` = the first read point, so everything before it (the shared
  prefix) comes from SGLang's radix cache and is not re-scored,
- ``token_ids_logprob`` = the choices' ids (the ten digits), so exactly those log-probs come back, never a top-K.

Results come from ``meta_info.input_token_ids_logprobs``: one entry per input token from ``logprob_start_len`` on,
each a list of ``[logprob, token_id, text]``; the entry of the token at exactly ``logprob_start_len`` is ``None``
(SGLang scores a token from the ones before it). One extra token is appended so the last read point, at the end
of the prompt, has a scored position.

Chat: the request is rendered with the model's template and sent as ``text``; the reply is ``text`` of the answer.
``base_url`` is the server root (``http://host:30000``), not ``/v1``; several roots (replicas of one model,
comma-separated or a sequence) share the load as in the OpenAI backend (:mod:`.http_calls`), and ``backend_id``
names the model only, so one cache serves any list of replicas.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from jaxtyping import Float
from torch import Tensor

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest, ScoreRequest
from nl_rewrite.llm.http_calls import CallSettings, HTTPBackend, Secret, ServerCalls, Sink
from nl_rewrite.llm.readout import choice_matrix, exact_row
from nl_rewrite.llm.templates import HOW_TO_PASS, ChatTemplate, find_template
from nl_rewrite.llm.token_layout import layout


class SGLangBackend(HTTPBackend):
    """Chat and score requests against an SGLang server's native API."""

    def __init__(self, base_url: str | Sequence[str] | None = None, model: str | None = None,
                 api_key: str | None = None, *, chat_template: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 4, progress: bool = False) -> None:
        urls = base_url or os.environ.get("NL_REWRITE_BASE_URL") or "http://127.0.0.1:30000"
        key = api_key or os.environ.get("SGLANG_API_KEY") or "EMPTY"  # the server's --api-key, if it has one
        # SGLang also serves the OpenAI-compatible /v1/models, which lists what each replica serves
        self.calls = ServerCalls(urls, key, CallSettings(concurrency, timeout, max_retries, progress), "/v1/models")
        self.base_url = self.calls.base_url
        self.model = model or os.environ.get("NL_REWRITE_MODEL") or ""
        template = find_template(chat_template, self.model)
        if template is None:
            raise LLMError(f"the SGLang backend tokenises prompts locally and needs the model's tokenizer and chat "
                           f"template; {HOW_TO_PASS}")
        self.template: ChatTemplate = template
        self.backend_id = f"sglang:{self.model or template.source}"  # not the URLs: replicas answer alike
        self.recipe_args = (urls, self.model, Secret(key), dict(
            chat_template=chat_template, concurrency=concurrency, timeout=timeout, max_retries=max_retries,
            progress=progress))

    def __repr__(self) -> str:
        return f"SGLangBackend(base_url={self.base_url!r}, model={self.model!r})"

    def chat_prompt(self, request: ChatRequest) -> str:
        return self.template.render(request)

    streams_answers = True
    """``chat`` and ``score`` take a ``sink`` that sees each answer as it arrives (``CachedBackend`` stores it)."""

    def chat(self, requests: Sequence[ChatRequest], sink: Sink | None = None) -> list[str]:
        return self.calls.gather(requests, self._chat_one, "chat", sink)

    async def _chat_one(self, client: Any, request: ChatRequest) -> str:
        body = {"text": self.chat_prompt(request),
                "sampling_params": {"max_new_tokens": request.max_tokens, "temperature": request.temperature}}
        return str(self._single(await self._generate(client, body)).get("text") or "")

    def score(self, requests: Sequence[ScoreRequest], sink: Sink | None = None
              ) -> list[Float[Tensor, "n_read n_choices"]]:
        return self.calls.gather(requests, self._score_one, "score", sink)

    async def _score_one(self, client: Any, request: ScoreRequest) -> Tensor:
        lay = layout(request, self.template.encode_prefix, self.template.encode_segment)
        if not lay.reads:
            return choice_matrix([], len(request.choices))
        if min(lay.reads) < 0:
            raise LLMError("a read point falls before the first token: the prompt is empty up to there")
        choice_ids = self.template.choice_ids(request.choices)
        ids = list(lay.ids) + choice_ids[:1]  # one more token, so the last read point has a scored position
        start = min(lay.reads)
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                "logprob_start_len": start, "token_ids_logprob": choice_ids}
        positions = self._single(await self._generate(client, body)).get("meta_info", {}).get(
            "input_token_ids_logprobs")
        if positions is None or len(positions) != len(ids) - start:
            raise LLMError(f"{self.calls.url()} returned {len(positions or [])} input_token_ids_logprobs for "
                           f"{len(ids) - start} scored tokens; is this an SGLang server (POST /generate)?")
        names = [str(i) for i in choice_ids]
        return choice_matrix([_row(positions[r + 1 - start], names) for r in lay.reads], len(names))

    async def _generate(self, client: Any, body: dict[str, Any]) -> Any:
        return await self.calls.call(lambda: client.post("/generate", cast_to=object, body=body))

    def _single(self, response: Any) -> dict[str, Any]:
        """A single prompt's answer (SGLang answers a batch with a list)."""
        out = response[0] if isinstance(response, list) and response else response
        if not isinstance(out, dict):
            raise LLMError(f"{self.calls.url()}/generate answered {type(out).__name__}, not a JSON object")
        return out


def _row(entry: list[list[Any]] | None, names: list[str]) -> list[float]:
    """One read point: every requested id comes back, so anything missing or null is unknown (NaN)."""
    if entry is None:
        raise LLMError("SGLang returned no token_ids logprobs at a read point (only logprob_start_len should)")
    return exact_row({str(int(item[1])): item[0] for item in entry}, names)
