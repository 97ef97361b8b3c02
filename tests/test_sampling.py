"""Example sampling: disjoint train/held-out/negatives, even coverage of quantile bins, seeded."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.latents.sampling import (SamplingConfig, SamplingError, quantile_bins, sample_latent, select_latents,
                                 top_examples, window_peaks)

from helpers import make_coder, make_windows


N_WINDOWS, WINDOW = 120, 8
QUIET, CUE = 7, 50
"""Token ids: the last ``N_QUIET`` windows repeat QUIET; exactly the first ``N_CUED`` windows start with CUE."""
N_QUIET, N_CUED = 20, 10
BUSY, SHORT, DEAD = 63, 62, 0
"""Planted latents: BUSY fires in every window but the quiet ones, SHORT only in the cued ones, DEAD never."""


def constant_window_input(model, token: int) -> torch.Tensor:
    """mlp_in.1 of a window repeating one token: the same at every position (attention averages equal values)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.full((1, WINDOW), token), names_filter="blocks.1.mlp.hook_in")
    x = cache["blocks.1.mlp.hook_in"][0]
    torch.testing.assert_close(x, x[:1].expand_as(x))
    return x[0]


def planted_coder_and_windows(model):
    """``make_coder()`` with three latents replaced so that which windows they fire in is known by construction.

    mlp_in.1 is RMS-normalised (norm ≈ √32 everywhere) and constant over a window of one repeated token, so a latent
    whose encoder row points along that constant vector q can be made to fire exactly where the input is (or is not)
    nearly parallel to q: BUSY fires unless cos(x, q_QUIET) > 0.9 (every random window has a position far from
    q_QUIET), SHORT only where cos(x, q_CUE) > 0.99 (position 0 of a window starting with CUE, where the input
    depends on that token alone), DEAD's bias is far below any |w·x| ≤ |w||x| ≈ 6. Their values, when they fire, are
    far above the other latents', so TopK keeps them."""
    coder = make_coder()
    tokens = make_windows(n=N_WINDOWS, window=WINDOW).tokens.clone()
    tokens[:, 0] = torch.where(tokens[:, 0] == CUE, CUE + 1, tokens[:, 0])
    tokens[:N_CUED, 0] = CUE
    tokens[-N_QUIET:] = QUIET
    windows = TokenWindows(tokens, [f"doc{i // 3}" for i in range(N_WINDOWS)], "explain")
    quiet, cue = constant_window_input(model, QUIET), constant_window_input(model, CUE)
    with torch.no_grad():
        for latent, q, sign, cos, scale in ((BUSY, quiet, -1, 0.9, 10.0), (SHORT, cue, 1, 0.99, 100.0)):
            coder.encoder.weight[latent] = sign * scale * q / q.norm()
            coder.encoder.bias[latent] = -sign * scale * cos * q.norm()
        coder.encoder.bias[DEAD] = -100.0
    return coder, windows


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    coder, windows = planted_coder_and_windows(tiny)
    folder = tmp_path_factory.mktemp("sampling")
    return LatentCache.build(tiny, coder, windows, folder, shard_windows=32, progress=False)


def test_planted_latents_fire_where_constructed(cache):
    firing = {latent: set(window_peaks(cache, latent)[0].tolist()) for latent in (BUSY, SHORT, DEAD)}
    assert firing[BUSY] == set(range(N_WINDOWS - N_QUIET))
    assert firing[SHORT] == set(range(N_CUED))
    assert firing[DEAD] == set()


def busy_latent(cache, need: int) -> int:
    """The planted BUSY latent, which by construction fires in all but the ``N_QUIET`` quiet windows."""
    fired = len(window_peaks(cache, BUSY)[0])
    assert need <= fired <= N_WINDOWS - N_QUIET, f"latent {BUSY} fires in {fired} windows, the test needs {need}"
    return BUSY


def test_examples_are_true_activations_and_disjoint(cache):
    cfg = SamplingConfig(n_train=10, n_heldout=10, n_negatives=8, n_bins=5)
    latent = busy_latent(cache, 20)
    ex = sample_latent(cache, latent, cfg)
    assert (len(ex.train), len(ex.heldout), len(ex.negatives)) == (10, 10, 8)
    train, held, neg = ({e.window_id for e in s} for s in (ex.train, ex.heldout, ex.negatives))
    assert len(train) == 10 and not train & held and not (train | held) & neg
    for e in ex.train + ex.heldout + ex.negatives:
        column = cache.dense_window(e.window_id)[:, latent]
        assert e.acts == pytest.approx(column.tolist(), abs=1e-6)
        assert e.tokens == cache.window_tokens(e.window_id)
    assert all(e.max_act > 0 for e in ex.train + ex.heldout)
    assert all(max(e.acts) == 0 for e in ex.negatives)
    peaks = [e.max_act for e in ex.train]
    assert peaks == sorted(peaks, reverse=True)


def test_train_and_heldout_cover_every_quantile_bin_evenly(cache):
    cfg = SamplingConfig(n_train=10, n_heldout=5, n_bins=5, n_negatives=0)
    latent = busy_latent(cache, 25)
    ranked, _ = window_peaks(cache, latent)
    bins = quantile_bins(ranked, 5)
    ex = sample_latent(cache, latent, cfg)
    for b in bins:
        members = set(b.tolist())
        assert sum(e.window_id in members for e in ex.train) == 2
        assert sum(e.window_id in members for e in ex.heldout) == 1


def test_seeded(cache):
    latent = busy_latent(cache, 20)
    a = sample_latent(cache, latent, SamplingConfig(n_train=6, n_heldout=6, n_bins=3, seed=1))
    b = sample_latent(cache, latent, SamplingConfig(n_train=6, n_heldout=6, n_bins=3, seed=1))
    c = sample_latent(cache, latent, SamplingConfig(n_train=6, n_heldout=6, n_bins=3, seed=2))
    ids = lambda x: [e.window_id for e in x.train + x.heldout + x.negatives]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)


def test_short_latents_split_in_proportion_and_dead_ones_refused(cache):
    ex = sample_latent(cache, SHORT, SamplingConfig(n_train=15, n_heldout=5, n_bins=5))
    assert len(ex.train) + len(ex.heldout) == N_CUED and len(ex.heldout) == 2  # 15:5 of 10 windows
    assert not {e.window_id for e in ex.train} & {e.window_id for e in ex.heldout}
    with pytest.raises(SamplingError, match=f"latent {DEAD} fires in 0 windows"):
        sample_latent(cache, DEAD, SamplingConfig())


def test_top_source_takes_the_strongest_windows(cache):
    latent = busy_latent(cache, 20)
    top = top_examples(cache, latent, 5)
    ex = sample_latent(cache, latent, SamplingConfig(n_train=5, n_heldout=5, n_bins=5, train_source="top"))
    assert [e.window_id for e in ex.train] == [e.window_id for e in top]
    assert min(e.max_act for e in ex.train) >= max(e.max_act for e in ex.heldout)


def test_select_latents(cache):
    count = cache.stats.count
    frequent = select_latents(cache, 5)
    assert [int(count[l]) for l in frequent] == sorted(count.tolist(), reverse=True)[:5]
    random = select_latents(cache, 5, "random", seed=3)
    assert random == select_latents(cache, 5, "random", seed=3) and all(count[l] >= 2 for l in random)
    with pytest.raises(ValueError, match="unknown latent selection"):
        select_latents(cache, 5, "best")


def test_config_validation():
    # train_source is a Literal: under the tests' runtime type checks the annotation rejects "bottom" first
    with pytest.raises((ValueError, TypeCheckError), match="train_source"):
        SamplingConfig(train_source="bottom")
    with pytest.raises(ValueError, match="n_bins"):
        SamplingConfig(n_bins=0)
