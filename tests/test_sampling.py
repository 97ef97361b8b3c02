"""Example sampling: disjoint train/held-out/negatives, even coverage of quantile bins, seeded."""

from __future__ import annotations

import pytest
import torch

from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.latents.sampling import (SamplingConfig, SamplingError, quantile_bins, sample_latent, select_latents,
                                 top_examples, window_peaks)

from test_latents import make_coder, make_windows


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampling")
    return LatentCache.build(tiny, make_coder(), make_windows(n=120, window=8), folder, shard_windows=32,
                             progress=False)


def busy_latent(cache, need: int) -> int:
    for latent in select_latents(cache, cache.n_latents):
        if len(window_peaks(cache, latent)[0]) >= need:
            return latent
    pytest.skip("no latent fires in enough windows")


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
    counts = {l: len(window_peaks(cache, l)[0]) for l in range(cache.n_latents)}
    short = next(l for l, n in counts.items() if 4 <= n < 20)
    ex = sample_latent(cache, short, SamplingConfig(n_train=15, n_heldout=5, n_bins=5))
    assert len(ex.train) + len(ex.heldout) == counts[short] and len(ex.heldout) >= 1
    assert not {e.window_id for e in ex.train} & {e.window_id for e in ex.heldout}
    dead = next(l for l, n in counts.items() if n == 0)
    with pytest.raises(SamplingError, match=f"latent {dead} fires in 0 windows"):
        sample_latent(cache, dead, SamplingConfig())


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
    with pytest.raises(ValueError, match="train_source"):
        SamplingConfig(train_source="bottom")
    with pytest.raises(ValueError, match="n_bins"):
        SamplingConfig(n_bins=0)
