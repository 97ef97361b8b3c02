"""Durable writes: a full disk or a failed write never replaces a good file with a partial one."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from nl_rewrite import durable
from nl_rewrite.durable import DiskFullError


def _full_disk(tmp):
    with open(tmp, "w") as fh:
        fh.write("{half")  # something reached the disk before it filled up
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_old_file_and_says_what_to_do(tmp_path):
    path = tmp_path / "results.json"
    durable.write_json(path, {"good": 1})
    with pytest.raises(DiskFullError, match="no space left.*results.json.*previous version is untouched"):
        durable.replace_file(path, _full_disk)
    assert json.loads(path.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the temporary file is gone


def test_a_failing_writer_leaves_no_trace(tmp_path):
    path = tmp_path / "w.safetensors"
    durable.save_tensors(path, {"x": torch.ones(3)})
    def broken(tmp):
        tmp.write_bytes(b"partial")
        raise ValueError("serialiser failed")

    with pytest.raises(ValueError, match="serialiser failed"):
        durable.replace_file(path, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_every_write_is_fsynced_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    durable.write_text(tmp_path / "a.txt", "hello")
    assert len(synced) == 2 and (tmp_path / "a.txt").read_text() == "hello"


def test_concurrent_writers_use_distinct_temporary_names(tmp_path):
    names = []
    durable.replace_file(tmp_path / "a", lambda tmp: (names.append(tmp.name), tmp.write_text("1")))
    durable.replace_file(tmp_path / "a", lambda tmp: (names.append(tmp.name), tmp.write_text("2")))
    assert names[0] != names[1] and all(n.startswith(".a.") for n in names)
