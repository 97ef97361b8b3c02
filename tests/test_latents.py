"""Latent cache: sparse rows match a dense recomputation, stats are right, identity is enforced, kill -9 resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.latents.cache import LatentCache, LatentCacheError

from helpers import N_LATENTS, make_coder, make_windows


def dense_reference(model, coder, windows: TokenWindows) -> torch.Tensor:
    """[n_windows, window, n_latents] TopK activations computed directly on the whole model."""
    with torch.no_grad():
        _, cache = model.run_with_cache(windows.tokens, names_filter="blocks.1.mlp.hook_in")
        latents = coder.encode(cache["blocks.1.mlp.hook_in"])
    return torch.zeros(*windows.tokens.shape, N_LATENTS).scatter_(-1, latents.indices, latents.values)


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    coder, windows = make_coder(), make_windows()
    folder = tmp_path_factory.mktemp("latents")
    cache = LatentCache.build(tiny, coder, windows, folder, shard_windows=5, batch_size=3, progress=False)
    return cache, dense_reference(tiny, coder, windows), coder, windows


def test_dense_window_matches_direct_computation(built):
    cache, dense, _, windows = built
    assert cache.meta.n_shards == 5
    for w in range(len(windows)):
        torch.testing.assert_close(cache.dense_window(w), dense[w], atol=1e-5, rtol=1e-5)
        assert cache.window_tokens(w) == windows.tokens[w].tolist()
    assert torch.equal(cache.tokens, windows.tokens)


def test_activations_are_the_latents_column(built):
    cache, dense, _, _ = built
    for latent in range(N_LATENTS):
        w, p, v = cache.activations(latent)
        expect = torch.nonzero(dense[..., latent] > 0)
        assert torch.equal(torch.stack([w, p], 1), expect)  # sorted by window, then position
        torch.testing.assert_close(v, dense[expect[:, 0], expect[:, 1], latent], atol=1e-5, rtol=1e-5)


def test_stats_match_dense_recomputation(built):
    cache, dense, _, windows = built
    flat = dense.reshape(-1, N_LATENTS)
    stats = cache.stats
    assert stats.n_tokens == flat.shape[0]
    assert torch.equal(stats.count, (flat > 0).sum(0))
    torch.testing.assert_close(stats.frequency, (flat > 0).float().mean(0))
    torch.testing.assert_close(stats.max, flat.max(0).values, atol=1e-5, rtol=1e-5)
    alive = stats.count > 0
    assert 0 < alive.sum() < N_LATENTS, "the test coder should have dead and live latents"
    assert stats.mean[~alive].isnan().all() and stats.quantiles[~alive].isnan().all()
    assert stats.quantiles.shape == (N_LATENTS, 11)
    for latent in torch.nonzero(alive).flatten().tolist():
        vals = flat[:, latent][flat[:, latent] > 0]
        torch.testing.assert_close(stats.mean[latent], vals.mean(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.quantiles[latent], torch.quantile(vals, torch.linspace(0, 1, 11)),
                                   atol=1e-5, rtol=1e-5)


def test_sample_is_sorted_capped_and_spans_the_distribution(tiny, tmp_path):
    coder, windows = make_coder(), make_windows()
    cache = LatentCache.build(tiny, coder, windows, tmp_path, shard_windows=8, sample_cap=5, progress=False)
    stats = cache.stats
    assert torch.equal(stats.sample_size, stats.count.clamp(max=5))
    for latent in stats.alive().tolist():
        sample = stats.sample[latent, :int(stats.sample_size[latent])]
        assert torch.all(sample[1:] >= sample[:-1])
        assert sample[-1] == stats.max[latent] and sample[0] == stats.quantiles[latent, 0]
    assert stats.sample[stats.count == 0].isnan().all()


def test_index_split_into_latent_ranges_gives_same_answers(tiny, tmp_path, built):
    reference, _, coder, windows = built
    cache = LatentCache.build(tiny, coder, windows, tmp_path, shard_windows=5, batch_size=3, max_index_rows=40,
                              progress=False)
    assert len(list((tmp_path / "index").iterdir())) > 3
    for latent in range(N_LATENTS):
        for a, b in zip(cache.activations(latent), reference.activations(latent)):
            assert torch.equal(a, b)
    assert torch.equal(cache.stats.quantiles.nan_to_num(-1), reference.stats.quantiles.nan_to_num(-1))


def test_refuses_other_coder_or_windows(tiny, tmp_path):
    LatentCache.build(tiny, make_coder(0), make_windows(), tmp_path, progress=False)
    with pytest.raises(LatentCacheError, match="coder_fingerprint"):
        LatentCache.build(tiny, make_coder(1), make_windows(), tmp_path, progress=False)
    with pytest.raises(LatentCacheError, match="windows_fingerprint"):
        LatentCache.build(tiny, make_coder(0), make_windows(seed=1), tmp_path, progress=False)
    again = LatentCache.build(tiny, make_coder(0), make_windows(), tmp_path, progress=False)
    assert again.shards_built == 0


def test_open_incomplete_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LatentCacheError, match="not a latent cache"):
        LatentCache.open(tmp_path)


CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from nl_rewrite.latents import cache as latents
    from nl_rewrite.model.loading import tiny_model
    from helpers import make_coder, make_windows
    torch.set_num_threads(1)
    slow = latents._build_shard
    def build_shard_slowly(*args, **kwargs):
        time.sleep(0.15)  # so the parent can kill us mid-run
        return slow(*args, **kwargs)
    latents._build_shard = build_shard_slowly
    model = tiny_model(n_layers=2, d_model=32, d_mlp=64, seed=0)
    print("started", flush=True)
    latents.LatentCache.build(model, make_coder(), make_windows(n=60), {folder!r}, shard_windows=2, batch_size=2,
                              progress=False)
""")


def test_resumes_after_sigkill(tiny, tmp_path):
    folder = tmp_path / "killed"
    script = CHILD.format(tests=str(Path(__file__).parent), folder=str(folder))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards = folder / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.safetensors"))) < 5:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(shards.glob("*.safetensors")))
    assert 5 <= done < 30, f"kill came too late or too early ({done} shards; stderr: {proc.stderr.read()[-2000:]})"
    assert not (folder / "stats.safetensors").exists()

    resumed = LatentCache.build(tiny, make_coder(), make_windows(n=60), folder, shard_windows=2, batch_size=2,
                                progress=False)
    assert resumed.shards_built == 30 - done
    clean = LatentCache.build(tiny, make_coder(), make_windows(n=60), tmp_path / "clean", shard_windows=2,
                              batch_size=2, progress=False)
    for i in range(30):
        a, b = load_file(str(shards / f"{i:05d}.safetensors")), load_file(str(tmp_path / "clean/shards" / f"{i:05d}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in b)
    for key, value in clean.stats.to_tensors().items():
        assert torch.equal(value.nan_to_num(-1), resumed.stats.to_tensors()[key].nan_to_num(-1)), key
