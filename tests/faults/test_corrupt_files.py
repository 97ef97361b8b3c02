"""Corrupt or truncated files: a clear error naming the file and the fix, or a safe automatic recovery."""

from __future__ import annotations

import pytest

from nl_rewrite.errors import LLMError
from nl_rewrite.latents.cache import LatentCache, LatentCacheError
from nl_rewrite.llm.base import ChatRequest
from nl_rewrite.llm.cache import CachedBackend

from fakes import FakeBackend
from helpers import make_coder, make_windows


def _build(tiny, folder):
    return LatentCache.build(tiny, make_coder(), make_windows(n=40, window=10), folder, shard_windows=10,
                             progress=False)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_shard_is_recomputed_on_rebuild(tiny, tmp_path, caplog):
    clean = _build(tiny, tmp_path / "clean")
    folder = tmp_path / "cache"
    _build(tiny, folder)
    _truncate(folder / "shards" / "00001.safetensors")
    rebuilt = _build(tiny, folder)
    assert rebuilt.shards_built == 1 and "unreadable" in caplog.text
    for key, value in clean.rows().items():
        assert (rebuilt.rows()[key] == value).all()


def test_a_truncated_shard_read_later_names_the_file_and_the_fix(tiny, tmp_path):
    folder = tmp_path / "cache"
    cache = _build(tiny, folder)
    _truncate(folder / "shards" / "00002.safetensors")
    with pytest.raises(LatentCacheError, match=r"00002.safetensors is corrupt or truncated.*rerun the build"):
        cache.rows([25])


def test_corrupt_statistics_are_rebuilt(tiny, tmp_path):
    folder = tmp_path / "cache"
    before = _build(tiny, folder).stats.frequency.clone()
    (folder / "stats.safetensors").write_bytes(b"garbage")
    with pytest.raises(LatentCacheError, match="stats.safetensors is corrupt"):
        LatentCache.open(folder)
    assert (_build(tiny, folder).stats.frequency == before).all()


def test_a_corrupt_call_cache_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "calls.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LLMError, match=r"calls.sqlite is not a readable sqlite call cache.*delete it"):
        CachedBackend(FakeBackend(), path).chat([ChatRequest((("user", "hi"),))])


def test_a_truncated_simulation_store_file_is_simulated_again(tmp_path, caplog):
    import logging

    import torch

    from nl_rewrite.interp.simulation_store import SimulationStore

    windows = {0: ["a", "b", "c"], 1: ["d", "e", "f"]}
    store = SimulationStore(tmp_path, "sim-v1")
    store.put(3, "dogs", list(windows.values()), torch.ones(2, 3))
    assert store.missing(3, "dogs", windows) == []
    _truncate(next(store.folder.glob("latent_3.safetensors")))
    with caplog.at_level(logging.WARNING, logger="nl_rewrite.interp.simulation_store"):
        assert sorted(store.missing(3, "dogs", windows)) == [0, 1]
    assert store.corrupt_files == 1 and "latent_3.safetensors is unreadable" in caplog.text
    store.put(3, "dogs", list(windows.values()), torch.zeros(2, 3))  # the rewrite replaces the bad file
    assert torch.equal(store.get(3, "dogs", windows), torch.zeros(2, 3))
