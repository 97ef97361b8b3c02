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


def reference_pav(y: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The hand-written pool-adjacent-violators the calibrator used before scipy: fitted value per point."""
    ends, means, weights = [], [], []
    for i, (value, w) in enumerate(zip(y, weight)):
        ends.append(i + 1), means.append(float(value)), weights.append(float(w))
        while len(means) > 1 and means[-2] > means[-1]:
            w_total = weights[-2] + weights[-1]
            means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w_total
            ends[-2], weights[-2] = ends[-1], w_total
            del ends[-1], means[-1], weights[-1]
    return np.repeat(means, np.diff([0, *ends]))


def assert_isotonic_optimum(fit: np.ndarray, y: np.ndarray, w: np.ndarray, tol: float = 1e-7) -> None:
    """KKT certificate that ``fit`` minimises sum w (y - f)^2 subject to f non-decreasing.

    The multiplier of the constraint f_k <= f_{k+1} is the cumulative weighted residual
    c_k = sum_{j<=k} w_j (y_j - f_j); the problem is convex, so ``fit`` is the (unique) optimum iff it
    is monotone, every c_k >= 0, c_n = 0, and c_k = 0 wherever f strictly increases."""
    scale = float(np.sum(w * np.abs(y))) + 1.0
    assert (np.diff(fit) >= -tol).all(), "not monotone"
    c = np.cumsum(w * (y - fit))
    assert c.min() >= -tol * scale, "a multiplier is negative: some prefix should move up"
    assert abs(c[-1]) <= tol * scale, "the total residual must vanish"
    rises = np.diff(fit) > tol
    assert np.abs(c[:-1][rises]).max(initial=0.0) <= tol * scale, "a rise where the prefix is not balanced"


def test_kkt_certificate_has_teeth():
    y, w = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 0.0]), np.ones(6)
    best = np.array([1, 7 / 3, 7 / 3, 7 / 3, 2.5, 2.5])  # known least-squares isotonic fit
    assert_isotonic_optimum(best, y, w)
    for wrong in (best + np.array([0, 0, 0, 0, 0.01, 0.01]), np.sort(y), np.full(6, y.mean())):
        with pytest.raises(AssertionError):
            assert_isotonic_optimum(wrong, y, w)


def calibrator_fit_at_unique_scores(scores: np.ndarray, acts: np.ndarray):
    """The calibrator's fitted value at each distinct score, plus the tie-pooled data it was fitted on."""
    cal = IsotonicCalibrator().fit(torch.tensor(scores), torch.tensor(acts))
    unique_x, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    y_mean = np.bincount(inverse, weights=acts) / counts
    fitted = np.interp(unique_x, cal.knots_x, cal.knots_y)  # float64: no float32 rounding from __call__
    return fitted, y_mean, counts.astype(np.float64), cal


@pytest.mark.parametrize("seed", range(8))
def test_isotonic_fit_equals_the_previous_pav_and_is_optimal(seed):
    gen = np.random.default_rng(seed)
    n = int(gen.integers(5, 400))
    # Coarse scores make ties (pooled before the fit); a noisy trend makes many violators to pool.
    scores = np.round(gen.uniform(0, 9, n), int(gen.integers(0, 2)))
    acts = np.maximum(0.0, 0.3 * scores + gen.normal(0, 1.5, n))
    fitted, y_mean, weight, cal = calibrator_fit_at_unique_scores(scores, acts)
    np.testing.assert_allclose(fitted, reference_pav(y_mean, weight), rtol=1e-10, atol=1e-12)
    assert_isotonic_optimum(fitted, y_mean, weight)
    # Equal scores get one value, and the per-point map is the pooled fit.
    per_point = cal(torch.tensor(scores)).numpy()
    np.testing.assert_allclose(per_point, fitted[np.unique(scores, return_inverse=True)[1]], rtol=1e-5, atol=1e-6)


def test_isotonic_loads_knots_saved_by_the_previous_implementation():
    # to_dict of the PAV-era calibrator on scores [1, 2, 2, 3], acts [1, 3, 1, 0]: blocks {1}, {2, 3}.
    saved = {"kind": "isotonic", "latent": 2, "fallback": None,
             "knots_x": [1.0, 1.0, 2.0, 3.0], "knots_y": [1.0, 1.0, 4 / 3, 4 / 3]}
    cal = calibrator_from_dict(saved)
    fresh = IsotonicCalibrator(latent=2).fit(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 1.0, 0.0]))
    assert fresh.knots_x == saved["knots_x"] and fresh.knots_y == pytest.approx(saved["knots_y"])
    grid = torch.linspace(0, 4, 41)
    torch.testing.assert_close(cal(grid), fresh(grid))


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


def test_a_kind_s_fitted_values_stay_its_first_positional_fields():
    """latent and fallback are shared keyword-only fields: positional construction means what it meant before."""
    assert LinearCalibrator(2.0).max_activation == 2.0 and LinearCalibrator(2.0).latent is None
    iso = IsotonicCalibrator([0.0, 1.0], [0.0, 3.0], latent=5)
    assert (iso.knots_x, iso.knots_y, iso.latent) == ([0.0, 1.0], [0.0, 3.0], 5)
    assert IsotonicCalibrator.from_dict(iso.to_dict()) == iso
