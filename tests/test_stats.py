"""nl_rewrite.evaluation.stats: seeded window resamples, percentile bootstrap CIs of a mean, the paired Wilcoxon test.

``ratio_ci`` is covered through ``EvalResults.fraction_recovered`` (tests/test_evaluator.py) and tests/test_recovery.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from jaxtyping import TypeCheckError

from nl_rewrite.evaluation.stats import bootstrap_indices, mean_ci, paired_wilcoxon


def per_window(n: int = 40, seed: int = 0, loc: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return loc + torch.randn(n, generator=gen, dtype=torch.double)


def test_bootstrap_indices_are_seeded_in_range_and_resample_with_replacement():
    idx = bootstrap_indices(30, 500, seed=3)
    assert idx.shape == (500, 30) and idx.dtype == torch.long
    assert int(idx.min()) == 0 and int(idx.max()) == 29
    assert torch.equal(idx, bootstrap_indices(30, 500, seed=3))
    assert not torch.equal(idx, bootstrap_indices(30, 500, seed=4))
    repeats = [len(set(row.tolist())) < 30 for row in idx]
    assert all(repeats)  # with replacement: 30 draws from 30 without a repeat has probability 30!/30^30 ≈ 3e-12


def test_mean_ci_is_the_percentiles_of_resampled_means():
    values = per_window()
    idx = bootstrap_indices(len(values), 2000, seed=0)
    means = values[idx].mean(1).numpy()
    for level in (0.95, 0.8):
        tail = 100 * (1 - level) / 2
        expected = np.percentile(means, [tail, 100 - tail])
        assert mean_ci(values, idx, level) == pytest.approx(tuple(expected), rel=1e-9)
    lo95, hi95 = mean_ci(values, idx)
    lo80, hi80 = mean_ci(values, idx, 0.8)
    assert lo95 < lo80 < float(values.mean()) < hi80 < hi95


def test_mean_ci_width_matches_the_standard_error():
    values = per_window(n=400, seed=1)
    lo, hi = mean_ci(values, bootstrap_indices(len(values), 4000, seed=0))
    assert lo < float(values.mean()) < hi
    se = float(values.std()) / math.sqrt(len(values))
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.1)


def test_mean_ci_covers_the_true_mean_at_about_the_nominal_rate():
    covered = 0
    for seed in range(200):
        values = per_window(n=30, seed=seed, loc=2.0)
        lo, hi = mean_ci(values, bootstrap_indices(len(values), 400, seed=seed))
        covered += lo <= 2.0 <= hi
    assert 0.88 <= covered / 200 <= 0.99  # percentile bootstrap with n=30 undercovers a little


def test_constant_values_give_a_zero_width_ci():
    values = torch.full((10,), 0.25, dtype=torch.double)
    assert mean_ci(values, bootstrap_indices(10, 100, seed=0)) == pytest.approx((0.25, 0.25))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_wilcoxon_agrees_with_scipy(seed):
    a = per_window(n=25, seed=seed)
    b = a + 0.3 * per_window(n=25, seed=seed + 10, loc=0.1)
    expected = scipy.stats.wilcoxon(a.numpy(), b.numpy()).pvalue
    assert paired_wilcoxon(a, b) == pytest.approx(expected, rel=1e-12)
    assert paired_wilcoxon(b, a) == pytest.approx(expected, rel=1e-12)  # two-sided


def test_paired_wilcoxon_small_for_a_consistent_shift_and_one_for_no_difference():
    a = per_window(n=15)
    shift = 0.1 + torch.linspace(0, 1, 15, dtype=torch.double)  # distinct, all positive: the exact test applies
    assert paired_wilcoxon(a + shift, a) == pytest.approx(2 / 2 ** 15)  # every difference has the same sign
    assert paired_wilcoxon(a, a.clone()) == 1.0


def test_paired_wilcoxon_needs_equal_lengths():
    a, b = per_window(n=5), per_window(n=6)
    if hasattr(paired_wilcoxon, "__wrapped__"):
        # runtime shape checks are on (tests/conftest.py): ``Float[Tensor, " n"]`` on both arguments rejects the call
        with pytest.raises(TypeCheckError, match=r"parameter 'b'[\s\S]*n=5"):
            paired_wilcoxon(a, b)
    unchecked = getattr(paired_wilcoxon, "__wrapped__", paired_wilcoxon)
    with pytest.raises(ValueError, match=r"equal lengths, got \(5,\) and \(6,\)"):
        unchecked(a, b)
