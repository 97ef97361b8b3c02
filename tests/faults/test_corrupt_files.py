"""Corrupt or truncated files: a clear error naming the file and the fix, or a safe automatic recovery."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_call_cache_is_moved_aside_and_the_calls_asked_again(tmp_path, caplog, damage):
    path = tmp_path / "calls.sqlite"
    requests = [ChatRequest((("user", f"question {i} " + "padding " * 50),)) for i in range(200)]
    first = CachedBackend(FakeBackend(), path)
    answers = first.chat(requests)
    first.close()
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        _truncate(path)
    again = CachedBackend(FakeBackend(), path)
    assert again.chat(requests) == answers and again.new_calls == len(requests)
    assert "calls.sqlite cannot be read" in caplog.text and len(list(tmp_path.glob("calls.sqlite.corrupt-*"))) == 1


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


def test_unreadable_records_are_dropped_and_the_rest_kept(tmp_path, caplog):
    import json
    from dataclasses import asdict, dataclass

    from nl_rewrite.io import RecordStore

    @dataclass
    class Note:
        latent: int
        settings: str
        text: str

        def to_dict(self) -> dict:
            return asdict(self)

    path = tmp_path / "notes.jsonl"
    good = [json.dumps(asdict(Note(i, "s", f"note {i}"))) for i in range(3)]
    path.write_bytes("\n".join([good[0], "\x00{garbage", good[1], '{"latent": 9}', good[2]]).encode() + b"\n\xff{half")
    store = RecordStore(path, "s", lambda d: Note(**d))
    assert sorted(store.records) == [0, 1, 2] and "dropping 2 unreadable record(s)" in caplog.text
    assert path.read_text().splitlines() == good  # rewritten without the damage, so appending stays clean
