"""Durable writes: a full disk or a failed write never replaces a good file with a partial one."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch

from nl_rewrite import io
from nl_rewrite.io import DiskFullError


def _full_disk(tmp):
    with open(tmp, "w") as fh:
        fh.write("{half")  # something reached the disk before it filled up
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_old_file_and_says_what_to_do(tmp_path):
    path = tmp_path / "results.json"
    io.write_json(path, {"good": 1})
    with pytest.raises(DiskFullError, match="no space left.*results.json.*previous version is untouched"):
        io.replace_file(path, _full_disk)
    assert json.loads(path.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the temporary file is gone


def test_a_failing_writer_leaves_no_trace(tmp_path):
    path = tmp_path / "w.safetensors"
    io.save_tensors(path, {"x": torch.ones(3)})
    def broken(tmp):
        tmp.write_bytes(b"partial")
        raise ValueError("serialiser failed")

    with pytest.raises(ValueError, match="serialiser failed"):
        io.replace_file(path, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_every_write_is_fsynced_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    io.write_text(tmp_path / "a.txt", "hello")
    assert synced == [False, True] and (tmp_path / "a.txt").read_text() == "hello"  # the file, then its folder


def test_a_full_disk_while_saving_tensors_is_a_disk_full_error(tmp_path, monkeypatch):
    path = tmp_path / "shard.safetensors"
    io.save_tensors(path, {"x": torch.ones(3)})
    good = path.read_bytes()

    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(path), "write_bytes", no_space)
    with pytest.raises(DiskFullError, match="shard.safetensors"):
        io.save_tensors(path, {"x": torch.zeros(1000)})
    with pytest.raises(DiskFullError):
        io.torch_save(tmp_path / "state.pt", {"step": 1})
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["shard.safetensors"]


def test_temporaries_of_killed_writers_are_cleaned_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".a.999999999.x1.tmp"  # no process has this pid
    live = tmp_path / f".a.{os.getpid()}.x2.tmp"  # a writer still running (this one)
    dead.write_text("partial")
    live.write_text("in progress")
    io.write_text(tmp_path / "a", "done")
    assert not dead.exists() and live.exists() and (tmp_path / "a").read_text() == "done"


def test_files_get_the_permissions_of_a_normal_new_file(tmp_path):
    mask = os.umask(0o022)
    try:
        io.write_text(tmp_path / "a", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644
