"""Remote backends against loopback servers that follow vLLM's, SGLang's and llama.cpp's documented response
schemas (tests/schema_servers.py), computed by the same weights as the embedded backend (tiny-smollm2, which has
SmolLM2's tokenizer and chat template; the real SmolLM2 where its own behaviour is the point): scores must
agree with the embedded backend read point for read point, and every failure mode must be a clear error."""

from __future__ import annotations

import logging
import time

import pytest
import torch

import schema_servers
from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest, ScoreRequest
from nl_rewrite.llm.openai_backend import OpenAIBackend, merge_prefill
from nl_rewrite.llm.readout import usable_rows
from nl_rewrite.llm.sglang_backend import SGLangBackend
from nl_rewrite.llm.token_layout import layout
from nl_rewrite.interp.simulate import SimulationItem, Simulator


EXPLANATION = "words about money, taxes and debt"
TOKENS = ("The", " government", " raised", " taxes", " and", " cut", " its", " debt", ".")


@pytest.fixture(scope="module")
def embedded():
    from nl_rewrite.llm.embedded import EmbeddedBackend

    return EmbeddedBackend("tiny-smollm2")


@pytest.fixture(scope="module")
def requests_(embedded):
    """Real simulator requests (all-at-once and two paper-mode ones), rendered with SmolLM2's template."""
    item = SimulationItem(EXPLANATION, TOKENS)
    return Simulator(embedded, "all_at_once").requests(item) + Simulator(embedded, "paper").requests(item)[3:5]


@pytest.fixture()
def server(request, embedded):
    flavor, settings = request.param
    srv, calls = schema_servers.start(flavor, embedded.model, embedded.tokenizer, **settings)
    yield srv, calls
    srv.shutdown()
    srv.server_close()


def _same_as_embedded(remote: list[torch.Tensor], local: list[torch.Tensor], atol: float = 1e-3,
                      min_usable: float = 0.9) -> None:
    rows = sum(r.shape[0] for r in remote)
    assert sum(int(usable_rows(r).sum()) for r in remote) >= min_usable * rows  # the comparison covers most reads
    for r, e in zip(remote, local):
        assert r.shape == e.shape
        ok = usable_rows(r)
        known = torch.isfinite(r) & ok[:, None]
        torch.testing.assert_close(r[known], e[known], atol=atol, rtol=0)


@pytest.mark.parametrize("server", [("sglang", {})], indirect=True)
def test_sglang_scores_equal_the_embedded_backend(server, embedded, requests_):
    srv, calls = server
    backend = SGLangBackend(schema_servers.url(srv), "tiny-smollm2", concurrency=2)
    remote = backend.score(requests_)
    assert all(bool(usable_rows(r).all()) and bool(torch.isfinite(r).all()) for r in remote)  # exact ids: no gaps
    _same_as_embedded(remote, embedded.score(requests_))
    body = calls[0]
    digit_ids = [embedded.choice_id(str(d)) for d in range(10)]
    assert body["sampling_params"] == {"max_new_tokens": 0} and body["return_logprob"] is True
    assert body["token_ids_logprob"] == digit_ids
    # scoring starts at the first read point, so the shared prefix before it comes from the radix cache
    layouts = [layout(r, embedded.encode_prefix, embedded.encode_segment) for r in requests_]
    assert sorted(c["logprob_start_len"] for c in calls) == sorted(min(lay.reads) for lay in layouts)
    assert all(min(lay.reads) >= lay.n_prefix - 1 for lay in layouts)


@pytest.mark.parametrize("server", [("sglang", {})], indirect=True)
def test_sglang_chat_continues_the_prefill(server, embedded):
    srv, _ = server
    request = ChatRequest((("user", "Name one animal."),), max_tokens=8, prefill="My answer is:")
    assert SGLangBackend(schema_servers.url(srv), "tiny-smollm2").chat([request]) == embedded.chat([request])


@pytest.mark.parametrize("server", [("vllm", {"max_logprobs": 20})], indirect=True)
def test_vllm_prompt_logprobs_equal_the_embedded_backend(server, embedded, requests_):
    srv, calls = server
    backend = OpenAIBackend(schema_servers.url(srv, "/v1"), "tiny-smollm2", score_mode="prompt_logprobs",
                            top_logprobs=3, max_logprobs=20, concurrency=2)
    remote = backend.score(requests_)
    _same_as_embedded(remote, embedded.score(requests_))
    assert backend.report.raised_k > 0  # top-3 missed digits: re-asked at the server's limit
    assert {c["prompt_logprobs"] for c in calls} == {3, 20}
    assert all(isinstance(t, int) for t in calls[0]["prompt"])  # token ids: the read points are exact
    n_nan = sum(int((~usable_rows(r)).sum()) for r in remote)
    assert n_nan == backend.report.unknown_reads == 0  # K=20 completed every read point that K=3 left unknown


@pytest.mark.parametrize("server", [("vllm", {"max_logprobs": 5})], indirect=True)
def test_vllm_limit_above_the_server_cap_is_a_clear_error(server, requests_):
    srv, _ = server
    backend = OpenAIBackend(schema_servers.url(srv, "/v1"), "tiny-smollm2", score_mode="prompt_logprobs",
                            top_logprobs=20, max_retries=3)
    with pytest.raises(LLMError, match="HTTP 400.*greater than max allowed: 5"):
        backend.score(requests_[:1])


@pytest.mark.parametrize("server", [("llamacpp", {})], indirect=True)
def test_auto_refuses_a_misaligned_echo_and_reads_per_point(server, embedded, requests_, caplog):
    srv, _ = server
    backend = OpenAIBackend(schema_servers.url(srv, "/v1"), "tiny-smollm2", concurrency=2)
    with caplog.at_level(logging.INFO, logger="nl_rewrite.llm.openai_backend"):
        remote = backend.score(requests_[:2])
    assert backend.score_mode == "per_read"
    assert "not using echo" in caplog.text and "do not spell the prompt" in caplog.text
    _same_as_embedded(remote, embedded.score(requests_[:2]))


@pytest.mark.parametrize("server", [("llamacpp", {})], indirect=True)
def test_echo_one_position_off_is_caught_by_the_probe(server, embedded, monkeypatch, caplog):
    """Without a template the probe has no special tokens, so only its distribution check can catch the shift."""
    monkeypatch.delenv("NL_REWRITE_CHAT_TEMPLATE", raising=False)
    srv, _ = server
    backend = OpenAIBackend(schema_servers.url(srv, "/v1"), "served-model")
    prefix = "For each word, rate from 0 to 9 how much it is about animals.\n" * 3
    requests = [ScoreRequest(prefix, ("cat\t", "8\n", "the\t", "0\n", "horse\t"), (0, 2, 4))]
    with caplog.at_level(logging.INFO, logger="nl_rewrite.llm.openai_backend"):
        remote = backend.score(requests)
    assert backend.score_mode == "per_read" and "differ from those of a completion cut there" in caplog.text
    _same_as_embedded(remote, embedded.score(requests), min_usable=0.6)  # 3 reads of a plain prompt


@pytest.mark.parametrize("server", [("llamacpp", {})], indirect=True)
def test_explicit_echo_on_a_misaligned_server_is_refused(server, requests_):
    srv, _ = server
    backend = OpenAIBackend(schema_servers.url(srv, "/v1"), "tiny-smollm2", score_mode="echo")
    with pytest.raises(LLMError, match="would read the wrong tokens"):
        backend.score(requests_[:1])


@pytest.mark.parametrize("server", [("llamacpp", {"logits_all": False})], indirect=True)
def test_unsupported_logprobs_fail_at_once_with_the_servers_message(server, requests_):
    srv, calls = server
    backend = OpenAIBackend(schema_servers.url(srv, "/v1"), "tiny-smollm2", score_mode="per_read")
    start = time.perf_counter()
    with pytest.raises(LLMError, match="HTTP 500.*logprobs is not supported"):
        backend.score(requests_[:1])
    assert len(calls) == 1 and time.perf_counter() - start < 5  # not retried


@pytest.mark.acceptance
def test_chat_without_template_merges_a_prefill_the_server_did_not_continue(monkeypatch):
    """What the real SmolLM2 does with a closed turn is the point here, so it is served (the rest use the tiny one)."""
    from nl_rewrite.llm.embedded import EmbeddedBackend

    monkeypatch.delenv("NL_REWRITE_CHAT_TEMPLATE", raising=False)
    real = EmbeddedBackend("smollm2-135m")
    srv, _ = schema_servers.start("llamacpp", real.model, real.tokenizer)
    try:
        _merges_a_prefill(OpenAIBackend(schema_servers.url(srv, "/v1"), "served-model"))
    finally:
        srv.shutdown()
        srv.server_close()


def _merges_a_prefill(backend: OpenAIBackend) -> None:
    assert backend.template is None
    # SmolLM2, its turn closed, restarts the answer and repeats the prefill: the merge keeps what follows it
    request = ChatRequest((("user", "Count from one to ten in words, separated by commas."),), max_tokens=16,
                          prefill="One, two, three, four,")
    reply = backend.chat([request])[0]
    assert backend.prefill_mode == "merge"
    assert backend.report.prefills_merged == 1
    assert "four," not in reply
    with pytest.raises(LLMError, match="no chat template.*NL_REWRITE_CHAT_TEMPLATE"):
        Simulator(backend).requests(SimulationItem(EXPLANATION, TOKENS))


@pytest.mark.parametrize("server", [("llamacpp", {})], indirect=True)
def test_chat_with_the_template_continues_the_prefill_exactly(server, embedded):
    srv, calls = server
    request = ChatRequest((("user", "Name one animal."),), max_tokens=8, prefill="My answer is:")
    backend = OpenAIBackend(schema_servers.url(srv, "/v1"), "tiny-smollm2")
    assert backend.chat([request]) == embedded.chat([request])
    assert calls[-1]["path"] == "/v1/completions" and calls[-1]["prompt"] == embedded.chat_prompt(request)


def test_simulator_requests_are_the_same_text_on_every_backend(embedded):
    item = SimulationItem(EXPLANATION, TOKENS)
    remote = OpenAIBackend("http://127.0.0.1:9/v1", "tiny-smollm2")
    sglang = SGLangBackend("http://127.0.0.1:9", "tiny-smollm2")
    for mode in ("all_at_once", "paper"):
        local = Simulator(embedded, mode).requests(item)
        assert Simulator(remote, mode).requests(item) == local == Simulator(sglang, mode).requests(item)


@pytest.mark.parametrize("prefill,reply,merged", [
    ("[EXPLANATION]: The marked words are all", "The marked words are all tax words", " tax words"),
    ("[EXPLANATION]: The words", "Sure. [EXPLANATION]: The words about debt", " about debt"),
    ("[EXPLANATION]: The words", "Something else entirely", None),
])
def test_merge_prefill(prefill, reply, merged):
    assert merge_prefill(prefill, reply) == merged
