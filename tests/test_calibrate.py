import json
import logging

import numpy as np
import pytest
import torch

from nl_rewrite.interp.calibrate import (
    CALIBRATIONS,
    IsotonicCalibrator,
    LinearCalibrator,
    QuantileCalibrator,
    calibrator_from_dict,
    count_fallbacks,
    make_calibrator,
    pool_adjacent_violators,
)


def synthetic_latent(n: int = 20_000, rate: float = 0.07, seed: int = 0):
    """A sparse latent (fires on ``rate`` of tokens, lognormal values) and a noisy simulated score of it."""
    gen = np.random.default_rng(seed)
    fires = gen.random(n) < rate
    acts = np.where(fires, gen.lognormal(0.0, 0.5, n), 0.0)
    scores = np.clip(acts * 2 + gen.normal(1.0, 1.0, n), 0, 9)
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(acts, dtype=torch.float32)


def test_linear_maps_nine_to_max_and_zero_to_zero():
    scores, acts = synthetic_latent()
    cal = LinearCalibrator().fit(scores, acts)
    out = cal(torch.tensor([0.0, 4.5, 9.0, 12.0]))
    assert out[0] == 0.0
    assert out[1] == pytest.approx(acts.max().item() / 2, rel=1e-5)
    assert out[2] == pytest.approx(acts.max().item(), rel=1e-5)
    assert out[3] == pytest.approx(acts.max().item(), rel=1e-5), "scores beyond 9 are clipped"


@pytest.mark.parametrize("rate", [0.003, 0.07, 0.4])
def test_quantile_reproduces_firing_rate_on_fresh_data(rate):
    fit_scores, fit_acts = synthetic_latent(rate=rate, seed=1)
    cal = QuantileCalibrator().fit(fit_scores, fit_acts)
    assert cal.firing_rate == pytest.approx(rate, abs=0.01)
    new_scores, new_acts = synthetic_latent(rate=rate, seed=2)
    out = cal(new_scores)
    simulated_rate = (out > 0).float().mean().item()
    real_rate = (new_acts > 0).float().mean().item()
    assert abs(simulated_rate - real_rate) < 0.01


def test_quantile_values_follow_the_real_nonzero_distribution():
    scores, acts = synthetic_latent(rate=0.2, seed=3)
    out = QuantileCalibrator().fit(scores, acts)(scores)
    real, sim = acts[acts > 0].numpy(), out[out > 0].numpy()
    for q in (0.1, 0.5, 0.9):
        assert np.quantile(sim, q) == pytest.approx(np.quantile(real, q), rel=0.05)
    assert (np.diff(out[torch.argsort(scores)].numpy()) >= -1e-6).all(), "rank mapping must be monotone"


def test_quantile_fit_from_distribution_matches_given_rate():
    gen = np.random.default_rng(0)
    scores = torch.tensor(gen.normal(size=5000))
    cal = QuantileCalibrator().fit_distribution(scores, nonzero_sample=gen.exponential(size=300), firing_rate=0.05)
    assert (cal(scores) > 0).float().mean().item() == pytest.approx(0.05, abs=0.01)


def test_isotonic_is_monotone_and_fits_a_step():
    scores, acts = synthetic_latent(rate=0.1, seed=4)
    cal = IsotonicCalibrator().fit(scores, acts)
    grid = torch.linspace(-1, 10, 500)
    out = cal(grid).numpy()
    assert (np.diff(out) >= -1e-6).all()
    assert out[0] < 0.2 and out[-1] > 1.0, "low scores ≈ not firing, high scores ≈ firing values"


def test_pav_matches_brute_force_on_small_example():
    starts, ends, values = pool_adjacent_violators(np.array([1.0, 3.0, 2.0, 2.0, 5.0, 0.0]), np.ones(6))
    fitted = np.repeat(values, ends - starts)
    # Known least-squares isotonic fit: 1, 7/3, 7/3, 7/3, 2.5, 2.5
    np.testing.assert_allclose(fitted, [1, 7 / 3, 7 / 3, 7 / 3, 2.5, 2.5])


@pytest.mark.parametrize("kind", CALIBRATIONS)
def test_json_round_trip_gives_the_same_map(kind):
    scores, acts = synthetic_latent(n=3000, seed=5)
    cal = make_calibrator(kind, latent=7).fit(scores, acts)
    again = calibrator_from_dict(json.loads(json.dumps(cal.to_dict())))
    assert type(again) is type(cal) and again.latent == 7
    torch.testing.assert_close(again(scores), cal(scores))
    assert type(cal).from_dict(cal.to_dict()).to_dict() == cal.to_dict()


@pytest.mark.parametrize("kind", CALIBRATIONS)
def test_never_firing_latent_falls_back_to_zero_counted_and_logged(kind, caplog):
    scores = torch.rand(100) * 9
    with caplog.at_level(logging.DEBUG, logger="nl_rewrite.interp.calibrate"):
        cal = make_calibrator(kind, latent=3).fit(scores, torch.zeros(100))
    assert cal.fallback
    assert "latent 3" in caplog.text
    assert (cal(scores) == 0).all()
    assert count_fallbacks([cal, make_calibrator(kind).fit(*synthetic_latent(n=500))]) == {cal.fallback: 1}


@pytest.mark.parametrize("kind", CALIBRATIONS)
def test_nan_scores_stay_nan(kind):
    scores, acts = synthetic_latent(n=2000, seed=6)
    cal = make_calibrator(kind).fit(scores, acts)
    out = cal(torch.tensor([float("nan"), 5.0]))
    assert torch.isnan(out[0]) and torch.isfinite(out[1])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown calibration"):
        make_calibrator("sigmoid")
    with pytest.raises(ValueError, match="pair up"):
        LinearCalibrator().fit(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="firing_rate"):
        QuantileCalibrator().fit_distribution(torch.zeros(3), torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="QuantileCalibrator"):
        QuantileCalibrator.from_dict(LinearCalibrator().to_dict())
