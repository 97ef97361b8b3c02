"""The cached-stage primitive: a result is reused only when its fingerprint matches and it reads back as the
stage's type; anything else is recomputed, damage with a warning naming the file."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import pytest

from nl_rewrite.pipeline.stage import cached


@dataclass(frozen=True)
class Info:
    family: str
    r: float


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_a_result_is_computed_once_then_reused_with_nan_intact(tmp_path):
    path = tmp_path / "info.json"
    compute, calls = _counting({"a": Info("oracle", math.nan), "b": Info("lexical", 0.5)})
    first = cached(path, "fp1", dict[str, Info], compute)
    again = cached(path, "fp1", dict[str, Info], compute)
    assert len(calls) == 1 and isinstance(again["a"], Info)
    assert math.isnan(again["a"].r) and again["b"] == first["b"]


def test_other_inputs_recompute_without_a_warning(tmp_path, caplog):
    path = tmp_path / "info.json"
    compute, calls = _counting([1, 2])
    cached(path, "fp1", list[int], compute)
    with caplog.at_level(logging.INFO):
        cached(path, "fp2", list[int], compute)
    assert len(calls) == 2 and "computed from other inputs" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert json.loads(path.read_text())["fingerprint"] == "fp2"


@pytest.mark.parametrize("content", [
    b"", b"\x00garbage", b'{"fingerprint": "fp1", "res', b'{"fingerprint": "fp1", "results": [1, 2]}',
    b'{"fingerprint": "fp1", "result": {"a": {"family": "oracle"}}}',
    b'{"fingerprint": "fp1", "result": {"a": {"family": "oracle", "r": "high"}}}', b"[1, 2]",
], ids=["empty", "garbage", "truncated", "older layout of other content", "missing field", "wrong type",
        "not an object"])
def test_a_damaged_result_is_recomputed_with_a_warning_naming_it(tmp_path, caplog, content):
    path = tmp_path / "info.json"
    path.write_bytes(content)
    compute, calls = _counting({"a": Info("oracle", 0.25)})
    with caplog.at_level(logging.WARNING):
        assert cached(path, "fp1", dict[str, Info], compute) == {"a": Info("oracle", 0.25)}
    assert calls == [1] and f"{path} cannot be read" in caplog.text
    assert cached(path, "fp1", dict[str, Info], compute) == {"a": Info("oracle", 0.25)} and calls == [1]


def test_a_result_in_the_older_layout_is_reused(tmp_path):
    """Before the primitive, each file named its one result key after its content ("results", "info", ...)."""
    path = tmp_path / "info.json"
    path.write_text(json.dumps({"fingerprint": "fp1", "info": {"a": {"family": "oracle", "r": 0.25}}}))
    compute, calls = _counting({})
    assert cached(path, "fp1", dict[str, Info], compute) == {"a": Info("oracle", 0.25)} and calls == []
