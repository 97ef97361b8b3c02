"""External: the OpenAI backend against llama.cpp's real server (llama-cpp-python), on the embedded SmolLM2 GGUF.

Runs when llama-cpp-python is installed (``pip install -c constraints.txt -e ".[llamacpp]"``; .ci/run does),
and is skipped with the reason otherwise. Default settings only: the template comes from the GGUF the server
names, ``auto`` settles the score mode, the explainer's prefill must be continued."""

from __future__ import annotations

import pytest

from nl_rewrite.llm import llamacpp
from nl_rewrite.llm.base import ScoreRequest
from nl_rewrite.llm.openai_backend import OpenAIBackend
from nl_rewrite.interp.backend_parity import compare_backends
from nl_rewrite.errors import LLMError

pytestmark = [pytest.mark.external, pytest.mark.slow,
              pytest.mark.skipif(not llamacpp.available(), reason='llama-cpp-python is not installed: pip install '
                                 '-c constraints.txt -e ".[llamacpp]" (compiles llama.cpp, ~10 min)')]


@pytest.fixture(scope="module")
def gguf():
    from nl_rewrite.model.loading import EMBEDDED

    return str(EMBEDDED["smollm2-135m"].locate_gguf())


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    with llamacpp.llamacpp_server(gguf, log_path=tmp_path_factory.mktemp("llamacpp") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def embedded():
    from nl_rewrite.llm.embedded import EmbeddedBackend

    return EmbeddedBackend("smollm2-135m")


def test_default_settings_score_like_the_embedded_backend(server, gguf, embedded):
    backend = OpenAIBackend(server, gguf, concurrency=2)
    assert backend.template is not None  # found in the GGUF the server names
    tokenize = lambda text: [embedded.tokenizer.decode([i])  # noqa: E731
                             for i in embedded.tokenizer(text, add_special_tokens=False).input_ids]
    report = compare_backends(embedded, backend, tokenize)
    for kind in ("all_at_once", "paper", "detection"):
        assert report[kind]["pearson"] >= 0.95, (kind, report)
        assert report[kind]["unknown"] <= report[kind]["n"] // 20, (kind, report)
    assert backend.score_mode == "per_read"  # llama.cpp's echo drops special tokens: the probe refuses it


def test_explainer_and_detection_scoring_run_through_the_server(server, gguf, tiny, tmp_path):
    """The real explainer (default prefill) and detection scorer, on a tiny model's latent cache."""
    from nl_rewrite.interp.explain import ExplainConfig, explain_latents
    from nl_rewrite.latents.cache import LatentCache
    from nl_rewrite.latents.sampling import SamplingConfig, select_latents
    from nl_rewrite.interp.score import ScoreConfig, score_explanations
    from helpers import make_coder, make_windows

    sampling = SamplingConfig(n_train=6, n_heldout=4, n_negatives=4, n_bins=3)
    cache = LatentCache.build(tiny, make_coder(), make_windows(n=60, window=10), tmp_path / "cache",
                              shard_windows=20, progress=False)
    backend = OpenAIBackend(server, gguf, concurrency=2)
    records = explain_latents(backend, cache, select_latents(cache, 2), ExplainConfig(max_tokens=40), sampling,
                              tmp_path / "e.jsonl", progress=False)
    assert all(r.ok for r in records), [r.error for r in records]
    for record in records:  # the prefill was continued, not restarted after it
        assert record.text.startswith("The marked words are all") and "are allThe" not in record.text
    scores = score_explanations(backend, cache, records, ScoreConfig(), sampling, progress=False)
    assert scores and all(s.n > 0 for s in scores)


def test_explicit_echo_is_refused_and_no_logits_fails_at_once(server, gguf, tmp_path):
    with pytest.raises(LLMError, match="would read the wrong tokens"):
        OpenAIBackend(server, gguf, score_mode="echo").score([ScoreRequest("Count: one,", (" two,",), (0,))])
    with llamacpp.llamacpp_server(gguf, logits_all=False, log_path=tmp_path / "nologits.log") as url:
        backend = OpenAIBackend(url, gguf, score_mode="per_read", max_retries=4)
        with pytest.raises(LLMError, match="logits_all"):
            backend.score([ScoreRequest("Count: one,", (" two,",), (0,))])
