"""The reference arms and diagnostics of benchmarks/explanation_detail.py, on latents defined by rules on the tokens."""

import pytest
import torch

from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder
from nl_rewrite.pipeline.results import FiringErrors
from nl_rewrite.pipeline.detail import (context_lookup, dense_values, firing_auroc, firing_errors, needs_work,
                                        output_error, values_condition)
from helpers import INCOME, RATE, TAX, THE, synthetic


def test_the_current_token_lookup_is_the_mean_activation_per_token():
    cache = synthetic()
    stat, held = list(range(200)), cache.tokens[200:]
    values = context_lookup(cache, stat, held, pairs=False)
    for token in range(1, 8):
        mask = cache.tokens[:200] == token
        expected = cache.values[:200][mask].mean(0)
        assert torch.allclose(values[held == token], expected.expand(int((held == token).sum()), -1), atol=1e-6)


def test_the_pair_lookup_knows_the_context_and_backs_off_for_unseen_pairs():
    cache = synthetic()
    held = cache.tokens[200:]
    values = context_lookup(cache, range(200), held, pairs=True)
    before = torch.cat([torch.zeros_like(held[:, :1]), held[:, :-1]], dim=1)
    assert torch.equal(values[..., 0][:, 1:] > 0, ((held == TAX) & (before == INCOME))[:, 1:])
    assert torch.equal(values[..., 1][:, 1:] > 0, ((held == RATE) & (before != THE))[:, 1:])
    assert (values[..., 0][:, 1:][((held == TAX) & (before == INCOME))[:, 1:]] == 5.0).all()
    # position 0 has no token before it: the current-token mean
    first_tax = held[:, 0] == TAX
    assert torch.allclose(values[first_tax, 0, 0], cache.values[:200][cache.tokens[:200] == TAX][:, 0].mean())
    rare = context_lookup(cache, range(200), held, pairs=True, min_count=10**6)
    assert torch.equal(rare, context_lookup(cache, range(200), held, pairs=False))


def test_firing_auroc_is_one_for_a_perfect_score_and_a_half_for_a_constant():
    true = torch.zeros(50, 3)
    true[::5, :] = 2.0
    assert firing_auroc(true * 3 + 1, true) == pytest.approx(1.0)
    assert firing_auroc(-true, true) == pytest.approx(0.0)
    assert firing_auroc(torch.ones(50, 3), true) == pytest.approx(0.5)
    assert firing_auroc(true, torch.zeros(50, 3)) != firing_auroc(true, torch.zeros(50, 3))  # NaN: nothing fires


def test_firing_errors_count_false_positives_and_misses_after_topk():
    true = torch.tensor([[[3.0, 0.0, 0.0, 1.0]]])
    simulated = torch.tensor([[[0.5, 2.0, 0.1, 0.0]]])  # with k=2 it fires on latents 0 and 1
    errors = firing_errors(simulated, true, k=2)
    assert errors.false_positive_rate == pytest.approx(0.5) and errors.false_negative_rate == pytest.approx(0.5)
    assert firing_errors(true, true, k=2) == FiringErrors(0.0, 0.0)


def test_the_explanations_that_most_need_work_are_the_costliest_first():
    true = torch.zeros(2, 3, 3)
    simulated = true.clone()
    simulated[0, 0] = torch.tensor([1.0, 2.0, 0.0])
    simulated[1, 2, 2] = 1.0
    rows = needs_work(output_error(simulated, true, torch.tensor([4.0, 1.0, 9.0])), {0: "zero", 1: "one"}, 2)
    assert [(r.latent, r.explanation) for r in rows] == [(2, ""), (0, "zero")]  # no text: an empty one
    assert [r.estimated_share for r in rows] == pytest.approx([9 / 17, 4 / 17])  # latents 0 and 1 tie: 0 first


def test_a_values_condition_writes_exactly_the_values_given():
    coder = SparseCoder(CoderConfig(d_in=8, d_out=8, n_latents=6, k=2, read_site="mlp_in.0", write_site="mlp_out.0",
                                    model="tiny"), seed=0)
    values = torch.rand(3, 5, 6) * 4
    assert torch.equal(dense_values(values_condition(coder, values, "v"), range(3), 5), values)
    assert torch.equal(dense_values(values_condition(coder, values, "v"), [2, 0], 5), values[[2, 0]])


def test_the_output_cost_weighs_squared_errors_by_the_decoder_row():
    true = torch.zeros(2, 3, 3)
    simulated = true.clone()
    simulated[0, 0] = torch.tensor([1.0, 2.0, 0.0])
    simulated[1, 2, 0] = 1.0
    cost = output_error(simulated, true, torch.tensor([4.0, 1.0, 9.0]))
    assert cost.tolist() == [8.0, 4.0, 0.0]
