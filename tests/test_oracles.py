import pytest
import torch

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.replacements.base import BatchInfo
from nl_rewrite.replacements.coders import TranscoderReplacement
from nl_rewrite.replacements.oracles import OracleReplacement, mean_pearson, noise_multiplier, noisy
from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder

N = 40


@pytest.fixture(scope="module")
def coder():
    cfg = CoderConfig(d_in=32, d_out=32, n_latents=N, k=4, read_site="mlp_in.1", write_site="mlp_out.1", model="tiny")
    return SparseCoder(cfg, seed=0)


def windows(n=6, pos=10):
    tokens = torch.randint(1, 90, (n, pos), generator=torch.Generator().manual_seed(1))
    return TokenWindows(tokens, ["d"] * n, "eval")


def test_true_oracle_equals_the_transcoder_within_1e5_ce(tiny, coder):
    res = Evaluator(tiny, windows(), 3, progress=False).run(
        [TranscoderReplacement(coder), OracleReplacement(coder, "true", name="oracle"),
         OracleReplacement(coder, "binary", mean_active=torch.full((N,), 5.0), name="binary")])
    for a, b in zip(res.ce["oracle"], res.ce["transcoder"]):
        assert abs(a - b) < 1e-5
    assert max(abs(a - b) for a, b in zip(res.ce["binary"], res.ce["transcoder"])) > 1e-4


def test_binary_oracle_reports_the_firing_pattern_at_the_mean_value(coder):
    rep = OracleReplacement(coder, "binary", latents=[1, 3], mean_active=torch.arange(N, dtype=torch.float32))
    true = torch.tensor([[[0.0, 2.0], [5.0, 0.0]]])
    assert rep.degrade(true, torch.tensor([0])).tolist() == [[[0.0, 3.0], [1.0, 0.0]]]


def sparse_acts(n=4000, m=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fires = torch.rand(n, m, generator=gen) < torch.linspace(0.02, 0.3, m)
    return fires * torch.rand(n, m, generator=gen).mul(3).add(0.5)


@pytest.mark.parametrize("target", [0.9, 0.7, 0.5, 0.3])
def test_noise_degraded_oracle_hits_its_target_correlation(target):
    acts = sparse_acts()
    c = noise_multiplier(acts, target, seed=0)
    fresh = sparse_acts(seed=1)  # a different sample and a different noise draw
    measured = mean_pearson(noisy(fresh, fresh.std(0), c, seed=7), fresh)
    assert abs(measured - target) <= 0.05


def test_noisy_oracle_is_seeded_per_window_not_per_batch(coder):
    rep = OracleReplacement(coder, "noisy", noise_sd=torch.ones(N), seed=3)
    true = torch.rand(2, 5, N)
    both = rep.degrade(true, torch.tensor([7, 8]))
    alone = rep.degrade(true[1:], torch.tensor([8]))
    assert torch.equal(both[1:], alone)


def test_oracle_needs_its_per_latent_inputs(coder):
    with pytest.raises(ValueError, match="mean_active"):
        OracleReplacement(coder, "binary")
    with pytest.raises(ValueError, match="one value per latent"):
        OracleReplacement(coder, "noisy", noise_sd=torch.ones(3))
    with pytest.raises(ValueError, match="unknown oracle mode"):
        OracleReplacement(coder, "psychic")
    BatchInfo  # imported for symmetry with the other replacement tests
