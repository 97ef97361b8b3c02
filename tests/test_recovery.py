import torch

from nl_rewrite.pipeline.answer import gap_sentence, r_for_half
from nl_rewrite.evaluation.evaluator import EvalResults
from nl_rewrite.evaluation.recovery import describe, gap, recovered


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
    sentence = gap_sentence({"ce": gap(res, "ce").as_list(), "kl": gap(res, "kl").as_list()}, 1240)
    assert "NOT significantly positive" in sentence and "undefined" in sentence


def test_r_for_half_interpolates_and_says_when_out_of_range():
    assert r_for_half([(0.3, 0.1), (0.7, 0.3), (0.9, 0.7), (1.0, 1.0)]) == "≈ 0.80"
    assert r_for_half([(0.3, 0.1), (0.9, 0.2)]).startswith("> 0.90")
    assert r_for_half([(0.3, 0.6), (0.9, 0.9)]).startswith("≤ 0.30")
