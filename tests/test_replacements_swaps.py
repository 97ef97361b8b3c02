"""Swaps of a simulation of every latent: true values on its firing pattern, its values on the true pattern."""

import pytest
import torch

from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder, SparseLatents
from nl_rewrite.interp.calibrate import LinearCalibrator
from nl_rewrite.replacements.base import BatchInfo
from nl_rewrite.replacements.simulated import NLSimulatorReplacement
from nl_rewrite.replacements.swaps import SWAPS, SwapReplacement, firing, swapped

N_LATENTS, K, POS, D = 24, 3, 5, 16


@pytest.fixture(scope="module")
def coder():
    cfg = CoderConfig(d_in=D, d_out=D, n_latents=N_LATENTS, k=K, read_site="mlp_in.0", write_site="mlp_out.0",
                      model="tiny")
    return SparseCoder(cfg, seed=0)


def simulation(coder, values: torch.Tensor, latents=range(N_LATENTS)) -> NLSimulatorReplacement:
    """A simulation writing ``values`` [windows, pos, n_latents] exactly (scores in [0, 9], identity calibrators)."""
    assert values.max() <= 9.0
    sims = {lat: {w: values[w, :, lat] for w in range(values.shape[0])} for lat in latents}
    return NLSimulatorReplacement(coder, sims, {lat: LinearCalibrator().fit_max(9.0) for lat in latents},
                                  list(latents))


def inputs(n: int = 2) -> tuple[torch.Tensor, BatchInfo]:
    x = torch.randn(n, POS, D, generator=torch.Generator().manual_seed(1))
    return x, BatchInfo(tokens=torch.zeros(n, POS, dtype=torch.long), window_ids=torch.arange(n))


def test_swapped_keeps_one_part_of_the_simulation_and_takes_the_other_from_the_truth():
    true = torch.tensor([[[3.0, 0.0, 0.0, 1.0]]])
    simulated = torch.tensor([[[0.5, 2.0, 0.1, 0.0]]])  # with k=2 it fires on latents 0 and 1
    assert firing(simulated, 2).tolist() == [[[True, True, False, False]]]
    # the pattern a coder's TopK gives these values, as the simulated condition decodes them
    values = torch.rand(4, 7, 12, generator=torch.Generator().manual_seed(3)) - 0.3
    kept = SparseLatents(*values.topk(5, dim=-1)).dense(12)
    assert torch.equal(firing(values, 5), kept > 0)
    assert swapped(simulated, true, 2, "simulated_firing").tolist() == [[[3.0, 0.0, 0.0, 0.0]]]
    assert swapped(simulated, true, 2, "true_firing").tolist() == [[[0.5, 0.0, 0.0, 0.0]]]
    with pytest.raises((ValueError, TypeError), match="differ|n_latents"):  # the suite's shape checks come first
        swapped(simulated[..., :3], true, 2, "true_firing")


@pytest.mark.parametrize("keep", SWAPS)
def test_a_perfect_simulation_swapped_either_way_is_the_coder(coder, keep):
    x, batch = inputs()
    true = coder.encode(x).dense(N_LATENTS).detach().clamp(max=9.0)
    assert true.max() < 9.0, "the identity calibrator must not clip in this test"
    rep = SwapReplacement(simulation(coder, true), keep, f"swap_{keep}")
    torch.testing.assert_close(rep(x, batch), coder(x).detach())


def test_each_swap_decodes_exactly_what_it_keeps(coder):
    x, batch = inputs()
    true = coder.encode(x).dense(N_LATENTS).detach()
    simulated = torch.rand(2, POS, N_LATENTS, generator=torch.Generator().manual_seed(2)) * 2
    for keep in SWAPS:
        written = swapped(simulated, true, K, keep)
        assert int((written > 0).sum(-1).max()) <= K
        rep = SwapReplacement(simulation(coder, simulated), keep, f"swap_{keep}")
        torch.testing.assert_close(rep(x, batch), (coder.decode(written) + coder.skip(x)).detach())
    # the two swaps differ from each other: the random simulation fires elsewhere and writes other values
    a, b = (SwapReplacement(simulation(coder, simulated), keep, keep)(x, batch) for keep in SWAPS)
    assert not torch.allclose(a, b)


def test_a_swap_needs_every_latent_simulated_and_a_known_part(coder):
    partial = simulation(coder, torch.ones(1, POS, N_LATENTS), latents=[0, 1])
    with pytest.raises(ValueError, match="2 of 24"):
        SwapReplacement(partial, "true_firing", "s")
    with pytest.raises((ValueError, TypeError), match="unknown swap|'values'"):  # or the suite's type checks
        SwapReplacement(simulation(coder, torch.ones(1, POS, N_LATENTS)), "values", "s")
