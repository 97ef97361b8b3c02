"""Detection scoring: metrics, request format, disjointness from the explainer's examples, resume, no logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nl_rewrite.errors import LLMError, NLRewriteError
from nl_rewrite.interp.explain import ExplainConfig, Explanation, explain_latents
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.latents.sampling import SamplingConfig, sample_latent, select_latents
from nl_rewrite.interp.score import (ScoreConfig, auroc, balanced_accuracy, load_scores, rank_latents, score_explanations,
                              score_latent)

from fakes import FakeBackend
from helpers import make_coder, make_windows

SAMPLING = SamplingConfig(n_train=6, n_heldout=4, n_negatives=5, n_bins=3)
YES, NO = torch.tensor([-0.1, -2.5]), torch.tensor([-2.5, -0.1])  # one read point's row


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("score")
    return LatentCache.build(tiny, make_coder(), make_windows(n=60, window=10), folder, shard_windows=20,
                             progress=False)


def explanation_for(cache, latent: int, text: str = "capital letters") -> Explanation:
    return Explanation(latent, text, True, "prompt", sample_latent(cache, latent, SAMPLING).train)


def text_of(cache, example) -> str:
    return "".join(cache.token_strings(example.tokens)).replace("\n", " ").strip()


def oracle(cache, latent: int, invert: bool = False):
    """A backend that answers Yes exactly on the latent's held-out activating texts."""
    positives = {text_of(cache, e) for e in sample_latent(cache, latent, SAMPLING).heldout}

    def score_fn(request, i):
        text = request.segments[i].split("Text: ", 1)[1].rsplit("\nAnswer:", 1)[0]
        return YES if (text in positives) != invert else NO
    return FakeBackend(score_fn=score_fn)


def test_metrics_by_hand():
    labels = np.array([True, True, False, False])
    margin = np.array([1.0, -1.0, -2.0, 0.5])
    assert balanced_accuracy(labels, margin) == 0.5
    assert auroc(labels, margin) == 0.75
    assert auroc(labels, np.zeros(4)) == 0.5  # ties count half
    assert math.isnan(balanced_accuracy(np.array([True, True]), np.array([1.0, 2.0])))


def test_requests_read_yes_no_after_the_text(cache):
    latent = select_latents(cache, 1)[0]
    backend = FakeBackend(score_fn=lambda r, i: YES)
    score_latent(backend, cache, explanation_for(cache, latent, "digits and dates"), ScoreConfig(), SAMPLING)
    request = backend.score_requests[0]
    assert request.choices == (" Yes", " No") and request.read_after == (0,)
    assert request.prefix.endswith("Explanation: digits and dates") and request.segments[0].endswith("\nAnswer:")
    assert len({r.prefix for r in backend.score_requests}) == 1  # shared prefix: computed once per latent


@pytest.mark.parametrize("invert,expected", [(False, 1.0), (True, 0.0)])
def test_oracle_and_anti_oracle(cache, invert, expected):
    latent = select_latents(cache, 1)[0]
    score = score_latent(oracle(cache, latent, invert), cache, explanation_for(cache, latent), ScoreConfig(), SAMPLING)
    assert (score.n_pos, score.n_neg, score.n_unusable) == (4, 5, 0)
    assert score.balanced_accuracy == expected and score.auroc == expected
    assert {i.window_id for i in score.items if i.label} == {e.window_id for e in sample_latent(cache, latent, SAMPLING).heldout}


def test_always_yes_is_chance(cache):
    latent = select_latents(cache, 1)[0]
    score = score_latent(FakeBackend(score_fn=lambda r, i: YES), cache, explanation_for(cache, latent), ScoreConfig(),
                         SAMPLING)
    assert score.balanced_accuracy == 0.5 and score.auroc == 0.5


def test_missing_logprobs_are_excluded_or_an_error(cache):
    latent = select_latents(cache, 1)[0]
    none = torch.full((2,), -math.inf)
    calls = iter(range(1000))
    partial = FakeBackend(score_fn=lambda r, i: none if next(calls) % 3 == 0 else YES)
    score = score_latent(partial, cache, explanation_for(cache, latent), ScoreConfig(), SAMPLING)
    assert score.n_unusable == 3 and score.n == 6
    with pytest.raises(LLMError, match="no finite log-prob"):
        score_latent(FakeBackend(score_fn=lambda r, i: none), cache, explanation_for(cache, latent), ScoreConfig(),
                     SAMPLING)


def test_refuses_heldout_shown_to_explainer(cache):
    latent = select_latents(cache, 1)[0]
    record = explanation_for(cache, latent)
    record.examples.append(sample_latent(cache, latent, SAMPLING).heldout[0])
    with pytest.raises(NLRewriteError, match="were shown to the explainer"):
        score_latent(FakeBackend(), cache, record, ScoreConfig(), SAMPLING)


def test_end_to_end_with_fake_explainer_resumes_and_ranks(cache, tmp_path):
    latents = select_latents(cache, 3)
    records = explain_latents(FakeBackend(scripted=["", "", ""]), cache, latents, ExplainConfig(prefill="", batch_size=1),
                              SAMPLING, progress=False)
    assert not records[0].ok and all(r.ok for r in records[1:])
    backend = FakeBackend()
    scores = score_explanations(backend, cache, records, ScoreConfig(), SAMPLING, tmp_path / "s.jsonl", progress=False)
    assert [s.latent for s in scores] == latents[1:]
    assert all(0 <= s.balanced_accuracy <= 1 for s in scores)
    assert len(backend.score_requests) == 2 * (4 + 5)
    again = FakeBackend()
    assert [s.to_dict() for s in score_explanations(again, cache, records, ScoreConfig(), SAMPLING,
                                                    tmp_path / "s.jsonl", progress=False)] == [s.to_dict() for s in scores]
    assert again.score_requests == []
    assert [s.to_dict() for s in load_scores(tmp_path / "s.jsonl")] == [s.to_dict() for s in scores]
    ranked = rank_latents(scores)
    assert sorted(ranked) == sorted(latents[1:])
    assert scores[[s.latent for s in scores].index(ranked[0])].balanced_accuracy == max(s.balanced_accuracy for s in scores)


@pytest.mark.acceptance
def test_real_embedded_explain_and_score_then_cached_rerun(smol, tmp_cache):
    """Two latents of a (random) coder on SmolLM2, explained and scored by the embedded SmolLM2."""
    from nl_rewrite.data.windows import token_windows
    from nl_rewrite.llm.cache import CachedBackend
    from nl_rewrite.llm.embedded import EmbeddedBackend
    from nl_rewrite.latents.sampling import window_peaks
    from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder

    coder = SparseCoder(CoderConfig(d_in=576, d_out=576, n_latents=2048, k=8, read_site="mlp_in.6",
                                    write_site="mlp_out.6"), seed=0)
    windows = token_windows(smol, "explain", window=32, max_windows=48)
    cache = LatentCache.build(smol, coder, windows, tmp_cache / "latents", shard_windows=16, progress=False)
    sampling = SamplingConfig(n_train=4, n_heldout=2, n_negatives=2, n_bins=2)
    cfg = ExplainConfig(batch_size=2, max_tokens=24)
    # latents that fire in some windows but not most, so there are held-out positives and negatives
    candidates = (l for l in select_latents(cache, 2048, "random") if 6 <= len(window_peaks(cache, l)[0]) <= 30)
    latents = [next(candidates), next(candidates)]
    inner = EmbeddedBackend("smollm2-135m")

    def run() -> tuple[CachedBackend, list, list]:
        backend = CachedBackend(inner, tmp_cache / "llm.sqlite")
        records = explain_latents(backend, cache, latents, cfg, sampling, progress=False)
        scores = score_explanations(backend, cache, records, ScoreConfig(), sampling, progress=False)
        return backend, records, scores

    first, records, scores = run()
    assert first.new_calls > 0
    ok = [r for r in records if r.ok]
    assert ok, f"every explanation failed: {[r.error for r in records]}"
    assert all(r.text.strip() and "<<" not in r.text for r in ok)
    assert len(scores) == len(ok)
    assert all(0.0 <= s.balanced_accuracy <= 1.0 and 0.0 <= s.auroc <= 1.0 for s in scores)
    assert all((s.n_pos, s.n_neg, s.n_unusable) == (2, 2, 0) for s in scores)
    second, records2, scores2 = run()
    assert second.new_calls == 0 and second.hits > 0
    assert [r.text for r in records2] == [r.text for r in records]
    assert [s.to_dict() for s in scores2] == [s.to_dict() for s in scores]


def test_cli_cache_explain_score(tmp_cache, capsys):
    """`nl-rewrite cache`, `explain` and `score` chained on the tiny model with a small saved coder."""
    from nl_rewrite.cli.main import main
    from nl_rewrite.coders.checkpoint import save_coder
    from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder

    save_coder(SparseCoder(CoderConfig(d_in=64, d_out=64, n_latents=256, k=8, read_site="mlp_in.1",
                                       write_site="mlp_out.1", model="tiny-smollm2"), seed=0), tmp_cache / "coder")
    folder = tmp_cache / "latents"
    assert main(["cache", "--coder", str(tmp_cache / "coder"), "--max-windows", "40", "--out", str(folder),
                 "--shard-windows", "16"]) == 0
    assert "3 shards (3 computed now)" in capsys.readouterr().out
    small = ["--n-train", "4", "--n-heldout", "2", "--n-negatives", "2", "--n-bins", "2",
             "--llm-cache", str(tmp_cache / "llm.sqlite"), "--backend", "embedded:tiny-smollm2"]
    assert main(["explain", "--cache", str(folder), "--latents", "1", "--select", "random", "--max-tokens", "16",
                 *small]) == 0
    assert "explanations" in capsys.readouterr().out and (folder / "explanations.jsonl").is_file()
    assert main(["score", "--cache", str(folder), *small]) == 0
    out = capsys.readouterr().out
    assert "balanced accuracy" in out or "scored 0 latents" in out
    assert main(["explain", "--cache", str(tmp_cache / "nowhere")]) == 2  # a clear error, not a traceback
