import logging
from dataclasses import dataclass

import pytest

from nl_rewrite.interp.selection import choose_latents, usable_pool

SCORES = {0: 0.9, 1: 0.5, 2: 0.7, 3: float("nan"), 4: 0.6, 5: 0.0}


def test_choose_by_score_best_first_unscored_last():
    assert choose_latents(1.0, "explanation_score", SCORES) == [0, 2, 4, 1, 5, 3]
    assert choose_latents(0.5, "simulation_score", SCORES) == [0, 2, 4]
    assert choose_latents(0.5, "explanation_score", SCORES, pool=[1, 5, 9]) == [1, 5], "9 is unscored: last"


def test_choose_fraction_edges_and_random_is_seeded():
    assert choose_latents(0.0, "random", SCORES) == []
    assert len(choose_latents(0.01, "random", SCORES)) == 1, "a positive fraction chooses at least one"
    a, b = choose_latents(0.5, "random", SCORES, seed=1), choose_latents(0.5, "random", SCORES, seed=1)
    assert a == b and len(a) == 3 and set(a) <= set(SCORES)
    assert {tuple(choose_latents(0.5, "random", SCORES, seed=s)) for s in range(10)} != {tuple(a)}


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_rejected(fraction):
    with pytest.raises(ValueError, match="fraction"):
        choose_latents(fraction, "random", SCORES)


def test_bad_order_or_missing_scores_rejected():
    with pytest.raises(ValueError, match="order"):
        choose_latents(0.5, "alphabetical", SCORES)
    with pytest.raises(ValueError, match="needs scores"):
        choose_latents(0.5, "explanation_score", None, pool=[1, 2])


@dataclass
class Record:
    latent: int
    text: str
    ok: bool


def test_usable_pool_excludes_failed_and_empty_explanations(caplog):
    records = [Record(0, "years", True), Record(1, "", True), Record(2, "money", False), Record(3, "not", True)]
    with caplog.at_level(logging.WARNING, logger="nl_rewrite.interp.selection"):
        pool, excluded = usable_pool(records)
    assert pool == [0, 3] and excluded == 2 and "2 latent(s)" in caplog.text
