"""Top-K gaps become -inf only when provably negligible, else NaN; unknown rows are never cached."""

from __future__ import annotations

import math

import torch

from nl_rewrite.llm.base import ScoreRequest
from nl_rewrite.llm.cache import CachedBackend
from nl_rewrite.llm.readout import choice_row, exact_row, topk_floor, usable_rows
from nl_rewrite.interp.simulate import expected_digits

DIGITS = [str(d) for d in range(10)]


def test_missing_choices_far_below_the_floor_are_negligible():
    top = {"0": math.log(0.9), "1": math.log(0.05), "x": math.log(0.001)}
    row = choice_row(top, DIGITS, topk_floor(top, 3))
    assert row[:2] == [math.log(0.9), math.log(0.05)] and all(v == -math.inf for v in row[2:])


def test_missing_choices_that_could_matter_make_the_row_unknown():
    top = {"0": math.log(0.05), "x": math.log(0.5), "y": math.log(0.04)}
    row = choice_row(top, DIGITS, topk_floor(top, 3))
    assert all(math.isnan(v) for v in row)
    assert math.isnan(float(expected_digits(torch.tensor([row]))[0]))
    assert not bool(usable_rows(torch.tensor([row]))[0])


def test_a_short_list_bounds_by_its_smallest_entry():
    # tokens keyed by text can merge, so fewer than K come back: the smallest is still a valid bound
    top = {"0": -0.1, "x": -3.0}
    assert topk_floor(top, 20) == -3.0
    assert all(math.isnan(v) for v in choice_row(top, DIGITS, topk_floor(top, 20)))


def test_exact_rows_treat_missing_or_null_as_unknown():
    values = {d: -2.3 for d in DIGITS}
    assert exact_row(values, DIGITS) == [-2.3] * 10
    assert all(math.isnan(v) for v in exact_row({**values, "3": None}, DIGITS))
    assert all(math.isnan(v) for v in exact_row({d: -1.0 for d in DIGITS[:9]}, DIGITS))


class _Gappy:
    backend_id = "gappy"

    def __init__(self):
        self.calls = 0

    def chat(self, requests):  # an LLMBackend answers both kinds of request; this test only scores
        raise AssertionError("not used")

    def score(self, requests):
        self.calls += 1
        return [torch.full((len(r.read_after), 10), math.nan) if "gap" in r.prefix else torch.zeros(1, 10)
                for r in requests]


def test_unknown_rows_are_not_cached(tmp_path):
    inner = _Gappy()
    cached = CachedBackend(inner, tmp_path / "c.sqlite")
    requests = [ScoreRequest("gap ", ("a",), (0,)), ScoreRequest("full ", ("a",), (0,))]
    cached.score(requests)
    cached.score(requests)
    assert cached.hits == 1 and cached.new_calls == 3  # the NaN answer is asked again, the full one is not
