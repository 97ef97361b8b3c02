"""Explainer: prompt marking and strengths, reply parsing, retries and counted failures, resumable JSONL."""

from __future__ import annotations

import json
import re

import pytest

from nl_rewrite.errors import NLRewriteError
from nl_rewrite.interp.explain import (ExplainConfig, ExplanationParseError, build_messages, explain_latents,
                                load_explanations, mark_example, parse_explanation, strength_list)
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.latents.sampling import SamplingConfig, sample_latent, select_latents

from fakes import FakeBackend, marked_words
from helpers import make_coder, make_windows

SAMPLING = SamplingConfig(n_train=6, n_heldout=4, n_negatives=4, n_bins=3)


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    return LatentCache.build(tiny, make_coder(), make_windows(n=60, window=10), folder, shard_windows=20,
                             progress=False)


def test_mark_example_wraps_runs_above_threshold():
    pieces = ["The", " cat", " sat", " on", " it"]
    assert mark_example(pieces, [0.0, 1.0, 0.5, 0.1, 0.3], 0.2) == "The <<cat sat>> on<< it>>".replace("<< it", " <<it")
    assert mark_example(["a\n", "b"], [0.0, 2.0], 0.2) == "a\\n<<b>>"
    assert strength_list(pieces, [0.0, 1.0, 0.5, 0.1, 0.3], 0.2, scale=2.0) == '("cat", 4), ("sat", 2), ("it", 1)'


def test_prompt_marks_exactly_the_strong_tokens(cache):
    latent = select_latents(cache, 1)[0]
    examples = sample_latent(cache, latent, SAMPLING)
    (_, system), (_, user) = build_messages(cache, examples, ExplainConfig())
    assert "[EXPLANATION]:" in system and "ABSENT" not in system
    blocks = user.split("\n\n")
    assert len(blocks) == len(examples.train)
    for block, ex in zip(blocks, examples.train):
        text_line = block.split("\n")[0]
        expected = [i for i, a in enumerate(ex.acts) if a >= 0.2 * max(ex.acts)]
        marked_chars = "".join(marked_words(text_line)).replace(" ", "")
        assert marked_chars == "".join(cache.token_strings([ex.tokens[i] for i in expected])).replace(" ", "")
        assert len(re.findall(r'", \d\)', block.split("\n")[1])) == len(expected)
    strongest = blocks[0].split("Activations: ")[1]
    assert ", 9)" in strongest  # the strongest example holds the strength-9 token


def test_contrastive_prompt_shows_negatives(cache):
    latent = select_latents(cache, 1)[0]
    examples = sample_latent(cache, latent, SAMPLING)
    (_, system), (_, user) = build_messages(cache, examples, ExplainConfig(variant="contrastive", n_contrastive=3))
    assert "ABSENT" in system and user.count("Absent: ") == 3
    assert "<<" not in user.split("Texts where the pattern is absent:")[1]


@pytest.mark.parametrize("reply,prefill,expected", [
    ("Thinking...\n[EXPLANATION]: Words about money.", "", "Words about money."),
    (" nouns naming <<places>>.\nMore rambling", "[EXPLANATION]: The marked words are all",
     "The marked words are all nouns naming places."),
    ('"Dates and years"', "", "Dates and years"),
])
def test_parse_explanation(reply, prefill, expected):
    assert parse_explanation(reply, prefill) == expected


@pytest.mark.parametrize("reply", ["", "   \n", "1234 !!", "word word word word word word", "[EXPLANATION]: x"])
def test_parse_rejects_garbage(reply):
    with pytest.raises(ExplanationParseError):
        parse_explanation(reply, "")


def test_parse_clips_long_replies():
    text = parse_explanation("[EXPLANATION]: " + " ".join(f"word{i} alpha" for i in range(200)), max_chars=50)
    assert len(text) <= 51 and text.endswith("…")


def test_explain_latents_fake_backend(cache, tmp_path):
    backend = FakeBackend()
    latents = select_latents(cache, 3)
    records = explain_latents(backend, cache, latents, ExplainConfig(prefill=""), SAMPLING, tmp_path / "e.jsonl",
                              progress=False)
    assert [r.latent for r in records] == latents and all(r.ok for r in records)
    for record, request in zip(records, backend.chat_requests):
        assert record.text.startswith("the words")  # the fake names the marked words of its own prompt
        assert request.messages[1][1] in record.prompt
        assert [e.window_id for e in record.examples] == [e.window_id for e in sample_latent(cache, record.latent, SAMPLING).train]
    stored = load_explanations(tmp_path / "e.jsonl")
    assert [r.to_dict() for r in stored] == [r.to_dict() for r in records]


def test_garbage_is_retried_then_counted_as_failure(cache, tmp_path):
    latents = select_latents(cache, 2)
    # latent 1: garbage, garbage, good; latent 2: garbage three times → failed (batch size 1 keeps order simple)
    backend = FakeBackend(scripted=["", "!!!", "[EXPLANATION]: capital letters", "", "...", "?? ??"])
    cfg = ExplainConfig(prefill="", batch_size=1, retry_temperatures=(0.7, 1.0))
    records = explain_latents(backend, cache, latents, cfg, SAMPLING, tmp_path / "e.jsonl", progress=False)
    assert records[0].ok and records[0].text == "capital letters" and records[0].attempts == 3
    assert not records[1].ok and records[1].text == "" and records[1].attempts == 3
    assert "empty reply" in records[1].error and "no words" in records[1].error
    assert [r.temperature for r in backend.chat_requests] == [0.0, 0.7, 1.0] * 2


def test_resume_skips_done_latents_and_survives_partial_line(cache, tmp_path):
    path = tmp_path / "e.jsonl"
    latents = select_latents(cache, 4)
    explain_latents(FakeBackend(), cache, latents[:2], ExplainConfig(), SAMPLING, path, progress=False)
    with open(path, "a") as fh:
        fh.write('{"latent": 99, "text": "half')  # what a kill mid-write leaves
    backend = FakeBackend()
    records = explain_latents(backend, cache, latents, ExplainConfig(), SAMPLING, path, progress=False)
    assert len(backend.chat_requests) == 2 and [r.latent for r in records] == latents
    assert [json.loads(line)["latent"] for line in path.read_text().splitlines()] == latents
    again = FakeBackend()
    explain_latents(again, cache, latents, ExplainConfig(), SAMPLING, path, progress=False)
    assert again.chat_requests == []
    with pytest.raises(NLRewriteError, match="other settings"):
        explain_latents(FakeBackend(), cache, latents, ExplainConfig(variant="contrastive"), SAMPLING, path)


def test_unsampleable_latent_is_a_failed_record(cache):
    dead = int((cache.stats.count == 0).nonzero()[0])
    backend = FakeBackend()
    [record] = explain_latents(backend, cache, [dead], ExplainConfig(), SAMPLING, progress=False)
    assert not record.ok and "fires in 0 windows" in record.error and backend.chat_requests == []
