import math

import torch

from nl_rewrite.pipeline.answer import condition_sentence, gap_sentence, r_for_half
from nl_rewrite.evaluation.evaluator import EvalResults
from nl_rewrite.evaluation.recovery import Recovered, describe, gap, gaps, recovered, recovery_table
from nl_rewrite.evaluation.stats import bootstrap_indices, ratio_ci


def results(zero_latents, transcoder, cond, n=40, noise=0.01, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = 3 + torch.rand(n, generator=gen)

    def col(offset):
        return (base + offset + noise * torch.randn(n, generator=gen)).tolist()

    ce = {"clean": base.tolist(), "transcoder": col(transcoder), "zero_latents": col(zero_latents), "cond": col(cond)}
    kl = {k: [abs(v - b) for v, b in zip(vals, base.tolist())] for k, vals in ce.items()}
    return EvalResults("all", list(range(n)), ce, kl, tokens_per_window=31)


def test_significant_gap_gives_a_fraction_with_a_ci_around_it():
    res = results(zero_latents=0.2, transcoder=0.0, cond=0.1)
    g = gap(res, "ce")
    assert g.lo > 0
    r = recovered(res, "cond", "ce")
    assert r.fraction is not None and r.fraction.lo < 0.5 < r.fraction.hi
    assert abs(r.fraction.value - 0.5) < 0.05
    assert r.nonpositive_denominators == 0
    assert r.p_vs_worse < 0.01


def test_gap_not_significant_branch_gives_no_number_and_says_so():
    res = results(zero_latents=0.0, transcoder=0.0, cond=0.0, noise=0.05)
    r = recovered(res, "cond", "ce")
    assert r.fraction is None
    assert "not significant" in r.reason
    assert r.nonpositive_denominators > 0, "resamples with a non-positive gap are counted"
    text = describe(r)
    assert "undefined" in text and "%" not in text
    sentence = gap_sentence(gaps(res), 1240)
    assert "NOT significantly positive" in sentence and "undefined" in sentence


def test_r_for_half_interpolates_and_says_when_out_of_range():
    assert r_for_half([(0.3, 0.1), (0.7, 0.3), (0.9, 0.7), (1.0, 1.0)]) == "≈ 0.80"
    assert r_for_half([(0.3, 0.1), (0.9, 0.2)]).startswith("> 0.90")
    assert r_for_half([(0.3, 0.6), (0.9, 0.9)]).startswith("≤ 0.30")


def test_ratio_ci_counts_resamples_without_a_ratio_instead_of_dropping_them():
    numer, denom = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
    idx = bootstrap_indices(2, 400, seed=3)
    ci = ratio_ci(numer, denom, idx)
    # independently: a resample's mean gap is positive only when it drew window 0 twice
    expected = int((idx != 0).any(dim=1).sum())
    assert 0 < expected < 400
    assert (ci.undefined, ci.n_resamples) == (expected, 400)
    lo, hi = ci  # still unpacks as the pair
    assert lo == 1.0 and hi == math.inf, "undefined resamples sit in the tail as +inf (numerator > 0), not dropped"
    assert not ci.reliable


def test_ratio_ci_is_reliable_up_to_one_tail_of_undefined_resamples():
    numer, denom = torch.tensor([1.0, 1.0]), torch.tensor([2.0, -1.0])
    for n_bad, reliable, hi in ((20, True, 0.5), (30, False, math.inf)):
        idx = torch.tensor([[0, 0]] * (1000 - n_bad) + [[1, 1]] * n_bad)
        ci = ratio_ci(numer, denom, idx)
        assert ci.undefined == n_bad and ci.undefined_share == n_bad / 1000
        assert ci.reliable is reliable and ci.lo == 0.5 and ci.hi == hi


def test_fraction_with_some_undefined_resamples_says_how_many():
    res = results(zero_latents=0.004, transcoder=0.0, cond=0.002, noise=0.01, seed=1)
    assert gap(res, "ce").lo > 0, "precondition: a significant but small gap"
    r = recovered(res, "cond", "ce")
    assert r.fraction is not None and 0 < r.nonpositive_denominators <= 25
    note = f"{r.nonpositive_denominators} of 1000 bootstrap resamples had an undefined ratio"
    assert note in describe(r)
    assert note in condition_sentence(recovery_table(res, ["cond"])["cond"])
    clean = recovered(results(zero_latents=0.2, transcoder=0.0, cond=0.1), "cond", "ce")
    assert clean.nonpositive_denominators == 0 and "undefined" not in describe(clean)


def test_too_many_undefined_resamples_make_the_fraction_undefined_in_words():
    r = Recovered(None, 40, 1000, 0.01, 0.5, "40 of 1000 resamples have a non-positive gap (an undefined ratio), "
                                              "more than the 2.5% the CI's tail can absorb")
    text = describe(r)
    assert "undefined" in text and "40 of 1000" in text and "[" not in text
