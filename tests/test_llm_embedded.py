"""The embedded backend on the real SmolLM2-135M: prefix reuse, read-point alignment, choices, chat."""

from __future__ import annotations

import pytest
import torch

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest, ScoreRequest

pytestmark = pytest.mark.acceptance

PREFIX = "For each word, rate from 0 to 9 how much it is about animals.\n" * 4
SEGMENTS = ("cat\t", "8\n", "the\t", "0\n", "horse\t")
DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def backend():
    from nl_rewrite.llm.embedded import EmbeddedBackend

    return EmbeddedBackend("smollm2-135m")


def _requests() -> list[ScoreRequest]:
    return [
        ScoreRequest(PREFIX, SEGMENTS, (0, 2, 4)),
        ScoreRequest(PREFIX, ("table\t", "1\n", "dog\t"), (2,)),
        ScoreRequest("Another prefix entirely.\n", ("bird\t",), (0,)),
    ]


def test_prefix_reuse_equals_recomputing_the_prefix(backend):
    from nl_rewrite.llm.embedded import EmbeddedBackend

    reused = backend.score(_requests())
    baseline = EmbeddedBackend("smollm2-135m", reuse_prefix=False)
    recomputed = baseline.score(_requests())
    for a, b in zip(reused, recomputed):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert PREFIX in backend._prefixes  # the shared prefix really went through the LRU


def test_batched_groups_equal_one_at_a_time(backend):
    from nl_rewrite.llm.embedded import EmbeddedBackend

    assert backend.batch_size > 1  # the fixture batches by default
    single = EmbeddedBackend("smollm2-135m", batch_size=1).score(_requests())
    for a, b in zip(single, backend.score(_requests())):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_read_points_match_a_plain_forward_pass(backend):
    request = _requests()[0]
    scores = backend.score([request])[0]
    ids = backend.encode_prefix(PREFIX)
    ends = []
    for segment in SEGMENTS:
        ids += backend.encode_segment(segment)
        ends.append(len(ids) - 1)
    assert ids == backend.tokenizer(request.prompt).input_ids  # these segments end on token boundaries
    with torch.inference_mode():
        logprobs = backend.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    digit_ids = [backend.choice_id(d) for d in DIGITS]
    expected = logprobs[[ends[i] for i in request.read_after]][:, digit_ids]
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    assert scores.shape == (3, 10) and bool((scores < 0).all())


def test_read_point_at_the_prefix_end_uses_the_prefix_logits(backend):
    at_end = backend.score([ScoreRequest(PREFIX + "cat\t", ("",), (0,))])[0]
    inside = backend.score([ScoreRequest(PREFIX, ("cat\t",), (0,))])[0]
    torch.testing.assert_close(at_end, inside, atol=1e-4, rtol=0)


def test_multi_token_choice_is_rejected_by_name(backend):
    with pytest.raises(LLMError, match="' 3'.*2 tokens"):
        backend.score([ScoreRequest(PREFIX, SEGMENTS, (0,), choices=(" 3",))])


def test_read_point_before_any_token_is_an_error(backend):
    with pytest.raises(LLMError, match="before the first token"):
        backend.score([ScoreRequest("", ("", "cat"), (0,))])


def test_chat_returns_the_continuation_without_prefill(backend):
    request = ChatRequest((("user", "Name one animal."),), max_tokens=12, prefill="My answer is:")
    reply = backend.chat([request])[0]
    assert reply and not reply.startswith("My answer is")
    n_tokens = len(backend.tokenizer(reply, add_special_tokens=False).input_ids)
    assert n_tokens <= 12 + 1  # decoding may re-split a token boundary
    assert backend.chat([request])[0] == reply  # greedy is deterministic


def test_sampled_chat_is_reproducible_per_request(backend):
    request = ChatRequest((("user", "Write a word."),), max_tokens=8, temperature=1.0)
    assert backend.chat([request]) == backend.chat([request])
