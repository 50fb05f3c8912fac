"""Ensemble smoothers: the EnKS and the IEnKS against the exact Kalman filter and smoothers.

On a linear Gaussian model (the one of test_assimilation.py), an ensemble whose sample moments
are exactly the prior's reproduces the Kalman filter; the smoothers then reproduce the
Rauch-Tung-Striebel smoother (fixed interval) and the fixed-lag Kalman smoother, computed here in
numpy with the transition matrix of the very rk4 step the smoothers integrate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from linear_gaussian import linear_model, rk4_step_matrix

import geonn
from geonn.assimilation import (
    ETKF,
    EnKS,
    IEnKS,
    ObservationError,
    SmootherResult,
    Subset,
    read_observations,
    rmse_time_mean,
    twin_experiment,
)
from geonn.errors import InputError

DT, EVERY, CYCLES = 0.05, 5, 16
M0, P0 = np.array([0.5, -0.5, 0.0]), np.diag([1.0, 0.5, 2.0])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def linear_twin():
    operator = Subset([0, 2], state_dim=3)
    std = torch.tensor([0.3, 0.5], dtype=torch.float64)
    ds = twin_experiment(linear_model, DT, EVERY * CYCLES, operator, ObservationError(std=std), every=EVERY,
                         x0=torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64), seed=1)
    obs = read_observations(ds)
    one_step = rk4_step_matrix(DT)
    transition = np.linalg.matrix_power(one_step, EVERY)
    H, R = operator.matrix.numpy(), np.diag(std.numpy() ** 2)
    y = obs.values[:, [0, 2]].numpy()
    return obs, transition, H, R, y


def kalman_filter(transition, H, R, y):
    """Forecast and analysis moments at each observation time."""
    mean, cov = M0.copy(), P0.copy()
    rows = []
    for k in range(len(y)):
        forecast_mean, forecast_cov = transition @ mean, transition @ cov @ transition.T
        gain = forecast_cov @ H.T @ np.linalg.inv(H @ forecast_cov @ H.T + R)
        mean = forecast_mean + gain @ (y[k] - H @ forecast_mean)
        cov = (np.eye(3) - gain @ H) @ forecast_cov
        rows.append((forecast_mean, forecast_cov, mean, cov))
    return rows


def rts_smoother(transition, H, R, y):
    """The Rauch-Tung-Striebel smoother at the observation times (no model error): means and covariances."""
    rows = kalman_filter(transition, H, R, y)
    mean, cov = rows[-1][2], rows[-1][3]
    out = [(mean, cov)]
    for k in range(len(y) - 2, -1, -1):
        analysis_mean, analysis_cov = rows[k][2], rows[k][3]
        forecast_mean, forecast_cov = rows[k + 1][0], rows[k + 1][1]
        gain = analysis_cov @ transition.T @ np.linalg.inv(forecast_cov)
        mean = analysis_mean + gain @ (mean - forecast_mean)
        cov = analysis_cov + gain @ (cov - forecast_cov) @ gain.T
        out.append((mean, cov))
    return out[::-1]


def fixed_lag(transition, H, R, y, lag):
    """Mean at each time k given the observations up to k + lag."""
    return np.array([rts_smoother(transition, H, R, y[: min(k + lag + 1, len(y))])[k][0] for k in range(len(y))])


def exact_ensemble(members: int, mean: np.ndarray, cov: np.ndarray, seed: int = 0) -> torch.Tensor:
    """An ensemble whose sample mean and (N - 1)-normalised covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(members, mean.size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (members - 1))
    z = torch.linalg.solve_triangular(chol, z.T, upper=False).T
    return torch.as_tensor(mean) + z @ torch.linalg.cholesky(torch.as_tensor(cov)).T


def stds(covariances) -> np.ndarray:
    return np.sqrt(np.array([np.diag(c) for c in covariances]))


# --- the EnKS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("members", [4, 30])
def test_enks_over_the_whole_record_is_the_rts_smoother(linear_twin, members):
    obs, transition, H, R, y = linear_twin
    smoother = rts_smoother(transition, H, R, y)
    filtered = kalman_filter(transition, H, R, y)
    result = EnKS(members=members, lag=CYCLES).assimilate(linear_model, obs, DT, ensemble=exact_ensemble(members, M0, P0))
    assert isinstance(result, SmootherResult) and result.smoothed_mean.shape == (CYCLES, 3)
    np.testing.assert_allclose(result.smoothed_mean.numpy(), [m for m, _ in smoother], rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.smoothed_spread.numpy(), stds(c for _, c in smoother), rtol=1e-9)
    np.testing.assert_allclose(result.analysis_mean.numpy(), [row[2] for row in filtered], rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.forecast_mean.numpy(), [row[0] for row in filtered], rtol=0, atol=1e-10)
    # the smoother is more certain than the filter, except at the last time, where they agree
    assert bool((result.smoothed_spread[:-1] < result.analysis_spread[:-1]).all())
    torch.testing.assert_close(result.smoothed_spread[-1], result.analysis_spread[-1])


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_enks_with_a_lag_is_the_fixed_lag_kalman_smoother(linear_twin, lag):
    obs, transition, H, R, y = linear_twin
    result = EnKS(members=6, lag=lag).assimilate(linear_model, obs, DT, ensemble=exact_ensemble(6, M0, P0))
    np.testing.assert_allclose(result.smoothed_mean.numpy(), fixed_lag(transition, H, R, y, lag), rtol=0, atol=1e-10)
    if lag == 0:
        torch.testing.assert_close(result.smoothed_mean, result.analysis_mean, rtol=0, atol=0)


def test_enks_analyses_are_the_etkfs_with_inflation_and_rotation(linear_twin):
    """Same seed, same draws: the EnKS's current ensemble is the ETKF's, inflation and rotation included;
    the rotation also turns the lagged ensembles, so the smoothed means stay those of the smoother."""
    obs = linear_twin[0]
    kwargs = {"prior_mean": torch.as_tensor(M0), "prior_spread": 1.0}
    etkf = ETKF(members=8, inflation=1.1, rotate=True, seed=4).assimilate(linear_model, obs, DT, **kwargs)
    enks = EnKS(members=8, lag=3, inflation=1.1, rotate=True, seed=4).assimilate(linear_model, obs, DT, **kwargs)
    torch.testing.assert_close(enks.analysis_mean, etkf.analysis_mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(enks.analysis_spread, etkf.analysis_spread, rtol=0, atol=1e-10)
    plain = EnKS(members=8, lag=3, inflation=1.1, seed=4).assimilate(linear_model, obs, DT, **kwargs)
    torch.testing.assert_close(enks.smoothed_mean[:3], plain.smoothed_mean[:3], rtol=0, atol=1e-10)


# --- the IEnKS ------------------------------------------------------------------------------------------


def test_ienks_with_lag_one_and_one_iteration_is_the_etkf(linear_twin):
    obs = linear_twin[0]
    ensemble = torch.as_tensor(M0) + torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    etkf = ETKF(members=7).assimilate(linear_model, obs, DT, ensemble=ensemble)
    ienks = IEnKS(members=7, lag=1, iterations=1).assimilate(linear_model, obs, DT, ensemble=ensemble)
    for name in ("analysis_mean", "analysis_spread", "forecast_mean", "forecast_spread", "ensemble"):
        torch.testing.assert_close(getattr(ienks, name), getattr(etkf, name), rtol=0, atol=1e-10)
    assert ienks.iterations.tolist() == [1] * CYCLES and ienks.inflation is None


@pytest.mark.parametrize(("lag", "iterations", "bundle", "atol"), [
    (1, 1, False, 1e-10), (1, 3, False, 1e-10), (3, 1, False, 1e-10), (3, 3, False, 1e-10),
    (3, 2, True, 1e-9),  # finite differences: exact for a linear model up to rounding of the 1e-4 bundle
])
def test_ienks_on_a_linear_model_is_the_kalman_filter_and_fixed_lag_smoother(linear_twin, lag, iterations, bundle, atol):
    """Gauss-Newton converges in one step on a linear model; further iterations change nothing."""
    obs, transition, H, R, y = linear_twin
    filtered = kalman_filter(transition, H, R, y)
    result = IEnKS(members=5, lag=lag, iterations=iterations, bundle=bundle).assimilate(
        linear_model, obs, DT, ensemble=exact_ensemble(5, M0, P0))
    np.testing.assert_allclose(result.analysis_mean.numpy(), [row[2] for row in filtered], rtol=0, atol=atol)
    np.testing.assert_allclose(result.analysis_spread.numpy(), stds(row[3] for row in filtered), rtol=0, atol=atol)
    np.testing.assert_allclose(result.smoothed_mean.numpy(), fixed_lag(transition, H, R, y, lag), rtol=0, atol=atol)
    assert result.iterations.tolist() == [iterations] * CYCLES


def test_ienks_stops_iterating_once_converged(linear_twin):
    obs = linear_twin[0]
    result = IEnKS(members=5, lag=2, iterations=10, tolerance=1e-20).assimilate(
        linear_model, obs, DT, ensemble=exact_ensemble(5, M0, P0))
    assert int(result.iterations.max()) <= 3  # the step after the exact one is ~0
    adaptive = IEnKS(members=5, lag=2, xN=2.0).assimilate(linear_model, obs, DT, ensemble=exact_ensemble(5, M0, P0))
    assert adaptive.inflation.shape == (CYCLES,) and bool((adaptive.inflation > 0.5).all())
    assert bool(torch.isfinite(adaptive.smoothed_mean).all())


def test_smoothers_reject_bad_settings(linear_twin):
    for bad in ({"lag": -1}, {"members": 1}, {"inflation": 0.0}):
        with pytest.raises(InputError, match=next(iter(bad))):
            EnKS(**{"members": 5, **bad})
    for bad in ({"lag": 0}, {"iterations": 0}, {"epsilon": 0.0}, {"xN": -1.0}, {"tolerance": -1.0}):
        with pytest.raises(InputError, match=next(iter(bad))):
            IEnKS(**{"members": 5, **bad})
    with pytest.raises(InputError, match="assimilate"):
        IEnKS(members=5).analyse(torch.zeros(5, 3), torch.zeros(2), Subset([0, 2], 3), ObservationError(std=1.0))
    with pytest.raises(InputError, match="multiples of dt"):
        IEnKS(members=5).assimilate(linear_model, linear_twin[0], 0.03, prior_mean=torch.zeros(3), prior_spread=1.0)


# --- Lorenz-63, sakov2012 ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ienks_beats_the_etkf_on_lorenz63():
    """sakov2012 setup (all observed every 25 steps, R = 2 I), 60 cycles: the IEnKS (DAPPER 1000-cycle
    rmse.a 0.30-0.31 vs the ETKF's 0.60) is well below the ETKF, its smoothed estimate below its
    analysis, and both far below the observation error and the free run."""
    model = geonn.Lorenz63()
    cycles, burn_in = 60, 10
    ds = twin_experiment(model, 0.01, 25 * cycles, Subset.all(3), ObservationError(std=math.sqrt(2.0)), every=25, seed=3)
    obs, truth = read_observations(ds), torch.as_tensor(ds.truth.values)
    kwargs = {"prior_mean": torch.as_tensor(ds.initial_truth.values), "prior_spread": math.sqrt(2.0)}
    ienks = IEnKS(members=10, lag=1, inflation=1.02, rotate=True).assimilate(model, obs, 0.01, **kwargs)
    etkf = ETKF(members=10, inflation=1.02, rotate=True).assimilate(model, obs, 0.01, **kwargs)
    enks = EnKS(members=10, lag=2, inflation=1.02, rotate=True).assimilate(model, obs, 0.01, **kwargs)
    free = geonn.rollout(model, kwargs["prior_mean"] + 0.1, 25 * cycles, 0.01)[25::25]
    rmse = {name: rmse_time_mean(value, truth, burn_in) for name, value in (
        ("ienks", ienks.analysis_mean), ("ienks_smoothed", ienks.smoothed_mean), ("etkf", etkf.analysis_mean),
        ("enks", enks.analysis_mean), ("enks_smoothed", enks.smoothed_mean), ("free", free))}
    assert rmse["ienks"] < 0.75 * rmse["etkf"] and rmse["ienks"] < 0.4
    assert rmse["ienks_smoothed"] < rmse["ienks"]
    assert rmse["enks"] == pytest.approx(rmse["etkf"], abs=1e-9) and rmse["enks_smoothed"] < rmse["enks"]
    assert rmse["free"] > 5 * math.sqrt(2.0)
