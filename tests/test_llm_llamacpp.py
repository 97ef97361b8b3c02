"""External: the OpenAI backend against llama.cpp's real server (llama-cpp-python), on the embedded SmolLM2 GGUF.

Runs when llama-cpp-python is installed (``pip install -c constraints.txt -e ".[llamacpp]"``; .ci/run does),
and is skipped with the reason otherwise. Default settings only: the template comes from the GGUF the server
names, ``auto`` settles the score mode, the explainer's prefill must be continued."""

from __future__ import annotations

import math

import pytest
import torch

from nl_rewrite.llm import llamacpp
from nl_rewrite.llm.base import ScoreRequest
from nl_rewrite.llm.openai_backend import OpenAIBackend
from nl_rewrite.errors import LLMError

pytestmark = [pytest.mark.external, pytest.mark.acceptance,
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


LIKELY = math.log(0.05)
"""Choices the embedded backend gives at least 5% are compared; rarer ones carry quantisation noise, not signal."""
TOLERANCE = {"detection": 0.3, "simulation": 1.0}
"""Largest |log-prob difference| allowed at a read point. llama.cpp runs the Q4_1 weights with 8-bit activations, the
embedded backend the de-quantised fp32 weights; measured: 0.145 on detection (compare_backends, docs/llm.md) and
0.81 on a likely digit of this window (CI, 2026-12-03; 1.46 over all digits with compare_backends)."""


def test_default_settings_give_the_embedded_backends_logprobs_at_every_read_point(server, gguf, embedded):
    """A few prompts, compared log-prob by log-prob at their read points (detection: " Yes"/" No" after one prompt
    per text; simulation: the ten digits after every token of one window, all at once)."""
    from nl_rewrite.interp.backend_parity import PROBE_EXPLANATIONS, PROBE_TEXTS
    from nl_rewrite.interp.score import ScoreConfig, detection_requests
    from nl_rewrite.interp.simulate import SimulationItem, Simulator

    backend = OpenAIBackend(server, gguf, concurrency=2)
    assert backend.template is not None  # found in the GGUF the server names
    tokens = [embedded.tokenizer.decode([i]) for i in embedded.tokenizer(PROBE_TEXTS[0], add_special_tokens=False).input_ids]
    requests = {"detection": detection_requests(PROBE_EXPLANATIONS[0], PROBE_TEXTS, ScoreConfig()),
                "simulation": Simulator(embedded, "all_at_once").requests(SimulationItem(PROBE_EXPLANATIONS[0],
                                                                                         tuple(tokens)))}
    for kind, batch in requests.items():
        for want, got in zip(embedded.score(batch), backend.score(batch)):
            assert got.shape == want.shape, kind
            compared = (want >= LIKELY) & torch.isfinite(got)
            assert compared.any(dim=1).all(), f"{kind}: a read point where llama.cpp returned no likely choice"
            worst = float((want - got).abs()[compared].max())
            assert worst <= TOLERANCE[kind], f"{kind}: log-probs differ by up to {worst:.3f} at a read point"
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
