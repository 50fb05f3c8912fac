"""Data assimilation: observation operators, the observation file, and the ensemble filters.

The filters are checked against the exact Kalman filter on a linear Gaussian model (written here
in numpy, with the transition matrix of the very rk4 step the filters integrate), and against
DAPPER's published scores on the Lorenz-63 setup of sakov2012 and Lorenz-96.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
from linear_gaussian import linear_model, rk4_step_matrix

import geonn
from geonn.assimilation import (
    ETKF,
    LETKF,
    EnKF,
    EnKFN,
    Function,
    Linear,
    ObservationError,
    Observations,
    Schedule,
    Subset,
    enkf_n_dual_cost,
    enkf_n_inflation,
    gaspari_cohn,
    mean_preserving_rotation,
    read_observations,
    ring_distance,
    rmse_time_mean,
    twin_experiment,
)
from geonn.assimilation.ensemble import MAX_MEMBERS
from geonn.errors import InputError, InputTypeError
from geonn.io import write_netcdf

ZERO = torch.zeros(3, dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- localisation ------------------------------------------------------------------------------------


def test_gaspari_cohn_matches_the_piecewise_polynomial():
    c = 2.5
    d = torch.tensor([0.0, 0.5 * c, c, 1.5 * c, 2.0 * c, 3.0 * c], dtype=torch.float64)
    # gaspari1999 eq. 4.10 evaluated by hand at r = 0, 0.5, 1, 1.5, 2, 3:
    # r = 0.5: 1 - 5/3 r^2 + 5/8 r^3 + 1/2 r^4 - 1/4 r^5;  r = 1.5: 4 - 5r + 5/3 r^2 + 5/8 r^3 - 1/2 r^4 + 1/12 r^5 - 2/(3r)
    expected = [1.0, 0.684895833333, 5.0 / 24.0, 0.016493055556, 0.0, 0.0]
    np.testing.assert_allclose(gaspari_cohn(d, c).numpy(), expected, atol=1e-11)
    assert float(gaspari_cohn(c, c)) == pytest.approx(0.2083, abs=1e-4)
    # continuous at the knots, non-increasing, compact support
    eps = 1e-9
    assert float(gaspari_cohn(c - eps, c)) == pytest.approx(float(gaspari_cohn(c + eps, c)), abs=1e-7)
    assert float(gaspari_cohn(2 * c - eps, c)) == pytest.approx(0.0, abs=1e-7)
    grid = gaspari_cohn(torch.linspace(0, 3 * c, 301, dtype=torch.float64), c)
    assert bool((torch.diff(grid) <= 1e-15).all()) and float(grid.min()) >= 0.0
    assert bool((gaspari_cohn(torch.tensor([1e6, 3.0]), math.inf) == 1).all())  # no localisation
    assert gaspari_cohn(torch.tensor([1.0], dtype=torch.float32), 2.0).dtype == torch.float32


def test_gaspari_cohn_rejects_bad_input():
    with pytest.raises(InputError, match="radius"):
        gaspari_cohn(1.0, 0.0)
    with pytest.raises(InputError, match="distance"):
        gaspari_cohn([-1.0, 1.0], 1.0)


def test_ring_distance_is_periodic():
    d = ring_distance(torch.tensor([0.0, 39.0]), torch.tensor([1.0, 20.0, 38.0]), 40)
    np.testing.assert_allclose(d.numpy(), [[1.0, 20.0, 2.0], [2.0, 19.0, 1.0]])


# --- observation operators and errors --------------------------------------------------------------


def test_subset_linear_function_shapes_and_jacobians():
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    subset = Subset([3, 1], state_dim=4)
    assert subset(x).shape == (5, 7, 2)
    torch.testing.assert_close(subset(x), x[..., [3, 1]])
    torch.testing.assert_close(subset(x), x @ subset.matrix.T)
    assert subset.linearise(x).shape == (5, 7, 2, 4)
    assert subset.positions.tolist() == [3.0, 1.0]
    assert Subset.all(4).indices == (0, 1, 2, 3)

    H = torch.randn(3, 4, dtype=torch.float64)
    linear = Linear(H)
    torch.testing.assert_close(linear(x), x @ H.T)
    torch.testing.assert_close(linear.linearise(x)[2, 3], H)

    square = Function(lambda v: v[..., :2] ** 2 + v[..., 2:3], obs_dim=2, state_dim=4)
    assert square(x).shape == (5, 7, 2)
    jac = square.linearise(x)
    assert jac.shape == (5, 7, 2, 4)
    expected = torch.zeros(5, 7, 2, 4, dtype=torch.float64)
    expected[..., 0, 0] = 2 * x[..., 0]
    expected[..., 1, 1] = 2 * x[..., 1]
    expected[..., :, 2] = 1.0
    torch.testing.assert_close(jac, expected)


def test_operators_reject_bad_input():
    with pytest.raises(InputError, match="indices"):
        Subset([0, 4], state_dim=4)
    with pytest.raises(InputError, match="indices"):
        Subset([1, 1], state_dim=4)
    with pytest.raises(InputError, match="state_dim=4"):
        Subset([0], state_dim=4)(torch.zeros(3))
    with pytest.raises(InputTypeError, match="x"):
        Subset([0], state_dim=4)([0.0, 1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="H"):
        Linear(torch.zeros(3))
    with pytest.raises(InputError, match="obs_dim=3"):
        Function(lambda v: v[..., :2], obs_dim=3)(torch.zeros(4))
    with pytest.raises(InputError, match="positions"):
        Linear(torch.eye(3), positions=[0.0, 1.0])


def test_observation_error_sample_whiten_and_inverse_sqrt():
    g = torch.Generator().manual_seed(0)
    R = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
    for error in (ObservationError(covariance=R), ObservationError(std=torch.tensor([1.5, 0.5, 2.0])), ObservationError(std=0.7)):
        cov = error.covariance(3)
        draws = error.sample((40000, 3), g)
        assert draws.shape == (40000, 3)
        np.testing.assert_allclose(np.cov(draws.numpy().T), cov.numpy(), atol=0.05 * float(cov.max()))
        whitened = error.whiten(draws)
        np.testing.assert_allclose(np.cov(whitened.numpy().T), np.eye(3), atol=0.04)
        root = error.inverse_sqrt(3)
        torch.testing.assert_close(root @ cov @ root, torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(root, root.T)
    assert ObservationError(std=0.7).dim is None and ObservationError(covariance=R).dim == 3
    assert not ObservationError(covariance=R).is_diagonal and ObservationError(std=1.0).is_diagonal
    restricted = ObservationError(covariance=R).restrict(torch.tensor([True, False, True]))
    torch.testing.assert_close(restricted.covariance(), R[[0, 2]][:, [0, 2]])


def test_observation_error_rejects_bad_input():
    with pytest.raises(InputError, match="exactly one"):
        ObservationError()
    with pytest.raises(InputError, match="exactly one"):
        ObservationError(std=1.0, covariance=torch.eye(2))
    with pytest.raises(InputError, match="std"):
        ObservationError(std=torch.tensor([1.0, 0.0]))
    with pytest.raises(InputError, match="std"):
        ObservationError(std=-1.0)
    with pytest.raises(InputError, match="positive-definite"):
        ObservationError(covariance=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(InputError, match="symmetric"):
        ObservationError(covariance=torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(InputError, match="dim"):
        ObservationError(std=torch.tensor([1.0, 2.0])).sample((4, 3))


def test_schedules_regular_irregular_and_with_gaps():
    assert Schedule.every(25, 100).steps == (25, 50, 75, 100)
    assert Schedule.every(3, 10, start=0).steps == (0, 3, 6, 9)
    mask = torch.zeros(21, dtype=torch.bool)
    mask[5::5] = True
    mask[10] = False  # a gap
    gaps = Schedule.from_mask(mask)
    assert gaps.steps == (5, 15, 20)
    assert torch.equal(gaps.mask(20), mask)
    assert Schedule([2, 3, 17]).steps == (2, 3, 17)
    with pytest.raises(InputError, match="increasing"):
        Schedule([3, 2])
    with pytest.raises(InputError, match="k"):
        Schedule.every(0, 10)


# --- twin experiments and the observation file -------------------------------------------------------


def test_twin_round_trip_through_netcdf(tmp_path):
    mask = Schedule.every(5, 200).mask(200)
    mask[50:100] = False  # an observing gap
    operator = Subset([0, 2], state_dim=3)
    error = ObservationError(std=torch.tensor([1.0, 2.0], dtype=torch.float64))
    ds = twin_experiment(geonn.Lorenz63(), 0.01, 200, operator, error, every=Schedule.from_mask(mask), spinup_steps=100, seed=4)
    assert ds.observations.dims == ("time", "component") and ds.truth.dims == ("time", "component")
    assert ds.sizes["time"] == int(mask.sum()) == 30
    np.testing.assert_allclose(ds.time.values, 0.01 * np.nonzero(mask.numpy())[0])
    assert np.isnan(ds.observations.values[:, 1]).all() and np.isfinite(ds.observations.values[:, [0, 2]]).all()
    assert ds.attrs["model"] == "lorenz63" and ds.attrs["dt"] == 0.01
    np.testing.assert_allclose(ds.obs_error_std.values, [1.0, np.nan, 2.0])
    noise = ds.observations.values[:, [0, 2]] - ds.truth.values[:, [0, 2]]
    assert 0.5 < noise[:, 0].std() < 1.5 and 1.0 < noise[:, 1].std() < 3.0

    path = write_netcdf(ds, tmp_path / "obs.nc")
    with xr.open_dataset(path) as back:
        xr.testing.assert_identical(back.load(), ds)
    from_file, in_memory = read_observations(path), read_observations(ds)
    for obs in (from_file, in_memory):
        torch.testing.assert_close(obs.times, torch.tensor(ds.time.values), rtol=0, atol=0)
        torch.testing.assert_close(obs.values, torch.tensor(ds.observations.values), equal_nan=True, rtol=0, atol=0)
        assert obs.operator.indices == (0, 1, 2) and obs.model == "lorenz63" and obs.dt == 0.01
        torch.testing.assert_close(obs.error.std[[0, 2]], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert from_file.steps(0.01) == np.nonzero(mask.numpy())[0].tolist()


def test_twin_with_a_non_subset_operator_uses_an_obs_dimension(tmp_path):
    H = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    ds = twin_experiment(geonn.Lorenz63(), 0.01, 100, Linear(H), ObservationError(std=0.5), every=10)
    assert ds.observations.dims == ("time", "obs") and ds.attrs["obs_error_std"] == 0.5
    write_netcdf(ds, tmp_path / "obs.nc")
    obs = read_observations(tmp_path / "obs.nc")
    assert obs.operator is None and obs.values.shape == (10, 2)
    obs = read_observations(tmp_path / "obs.nc", operator=Linear(H))
    with pytest.raises(InputError, match="obs_dim=2"):
        read_observations(ds, operator=Subset([0, 1, 2], 3))
    with pytest.raises(InputError, match="operator"):
        ETKF(members=5).assimilate(geonn.Lorenz63(), read_observations(ds), 0.01, prior_mean=ZERO, prior_spread=1.0)
    result = ETKF(members=5).assimilate(geonn.Lorenz63(), obs, 0.01, ensemble=torch.randn(5, 3, dtype=torch.float64) + 5)
    assert result.analysis_mean.shape == (10, 3)


def _observation_file(**changes) -> xr.Dataset:
    ds = xr.Dataset(
        {"observations": (("time", "component"), np.array([[1.0, np.nan], [np.nan, 2.0], [3.0, 4.0]]))},
        coords={"time": [0.1, 0.2, 0.3], "component": ["a", "b"]},
        attrs={"obs_error_std": 1.0},
    )
    for key, value in changes.items():
        if key == "attrs":
            ds.attrs.update(value)
        elif value is None:
            ds = ds.drop_vars(key) if key in ds.variables else ds
        else:
            ds[key] = value
    return ds


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (_observation_file().rename({"observations": "y"}), "missing variable 'observations'"),
        (_observation_file(attrs={"obs_error_std": 0.0}), "obs_error_std"),
        (_observation_file(attrs={"obs_error_std": -2.0}), "obs_error_std"),
        (_observation_file().drop_attrs(), "obs_error_std"),
        (_observation_file(obs_error_std=("component", [1.0, -1.0])).drop_attrs(), "positive where observed"),
        (_observation_file(observations=(("time", "component"), [[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]])), "row 1"),
        (_observation_file().assign_coords(time=[0.1, 0.3, 0.2]), "strictly increasing"),
        (_observation_file().assign_coords(time=[0.1, 0.1, 0.2]), "strictly increasing"),
        (_observation_file(observations=(("time", "x"), np.ones((3, 2)))), "dims"),
    ],
)
def test_read_observations_names_the_problem(dataset, message):
    with pytest.raises(InputError, match=message):
        read_observations(dataset)


def test_read_observations_rejects_missing_files_and_wrong_types(tmp_path):
    with pytest.raises(InputError, match="existing"):
        read_observations(tmp_path / "nope.nc")
    with pytest.raises(InputTypeError, match="source"):
        read_observations(42)
    obs = read_observations(_observation_file())
    assert obs.values.shape == (3, 2) and obs.model is None and obs.dt is None
    with pytest.raises(InputError, match="multiples of dt"):
        obs.steps(0.03)


# --- linear Gaussian model: the exact Kalman filter ------------------------------------------------

DT, EVERY, CYCLES = 0.05, 5, 20
M0, P0 = np.array([0.5, -0.5, 0.0]), np.diag([1.0, 0.5, 2.0])


@pytest.fixture(scope="module")
def linear_twin():
    operator = Subset([0, 2], state_dim=3)
    std = torch.tensor([0.3, 0.5], dtype=torch.float64)
    ds = twin_experiment(linear_model, DT, EVERY * CYCLES, operator, ObservationError(std=std), every=EVERY,
                         x0=torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64), seed=1)
    obs = read_observations(ds)
    # the transition over one cycle: the matrix of the rk4 step applied to the identity's columns
    one_step = rk4_step_matrix(DT)
    transition = np.linalg.matrix_power(one_step, EVERY)
    H, R = operator.matrix.numpy(), np.diag(std.numpy() ** 2)
    mean, cov = M0.copy(), P0.copy()
    means, covs, forecasts = [], [], []
    for k in range(CYCLES):
        mean, cov = transition @ mean, transition @ cov @ transition.T
        forecasts.append((mean, cov))
        y = obs.values[k, [0, 2]].numpy()
        gain = cov @ H.T @ np.linalg.inv(H @ cov @ H.T + R)
        mean, cov = mean + gain @ (y - H @ mean), (np.eye(3) - gain @ H) @ cov
        means.append(mean)
        covs.append(cov)
    return obs, np.array(means), np.array(covs), forecasts


def exact_ensemble(members: int, mean: np.ndarray, cov: np.ndarray, seed: int = 0) -> torch.Tensor:
    """An ensemble whose sample mean and (N - 1)-normalised covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(members, mean.size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (members - 1))
    z = torch.linalg.solve_triangular(chol, z.T, upper=False).T
    return torch.as_tensor(mean) + z @ torch.linalg.cholesky(torch.as_tensor(cov)).T


@pytest.mark.parametrize(("method", "tolerance"), [(ETKF(members=2000, seed=1), 0.05), (EnKF(members=2000, seed=1), 0.15)])
def test_large_ensembles_converge_to_the_kalman_filter(linear_twin, method, tolerance):
    obs, kf_means, kf_covs, _ = linear_twin
    spread = torch.as_tensor(np.sqrt(np.diag(P0)))
    result = method.assimilate(linear_model, obs, DT, prior_mean=torch.as_tensor(M0), prior_spread=spread)
    kf_std = np.sqrt(np.diagonal(kf_covs, axis1=1, axis2=2))
    error = np.abs(result.analysis_mean.numpy() - kf_means) / kf_std  # in analysis standard deviations
    assert error.max() < tolerance
    np.testing.assert_allclose(result.analysis_spread.numpy(), kf_std, rtol=tolerance)
    assert result.forecast_mean.shape == result.analysis_mean.shape == (CYCLES, 3)


@pytest.mark.parametrize("members", [4, 7, 50])
def test_etkf_is_exactly_the_kalman_filter_for_an_exact_prior(linear_twin, members):
    obs, kf_means, kf_covs, forecasts = linear_twin
    # one step: a prior with exactly the KF forecast moments gets exactly the KF analysis moments
    prior_mean, prior_cov = forecasts[3]
    prior = exact_ensemble(members, prior_mean, prior_cov, seed=members)
    analysis = ETKF(members=members).analyse(prior, obs.values[3], obs.operator, obs.error).numpy()
    np.testing.assert_allclose(analysis.mean(0), kf_means[3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.cov(analysis.T), kf_covs[3], rtol=0, atol=1e-12)
    # cycling: the linear forecast keeps the sample moments exact, so every analysis is the KF's
    result = ETKF(members=members).assimilate(linear_model, obs, DT, ensemble=exact_ensemble(members, M0, P0))
    np.testing.assert_allclose(result.analysis_mean.numpy(), kf_means, rtol=0, atol=1e-10)
    kf_std = np.sqrt(np.diagonal(kf_covs, axis1=1, axis2=2))
    np.testing.assert_allclose(result.analysis_spread.numpy(), kf_std, rtol=1e-10)


def test_rotation_and_inflation_keep_the_mean():
    g = torch.Generator().manual_seed(0)
    rotation = mean_preserving_rotation(6, g)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(rotation.sum(1), torch.ones(6, dtype=torch.float64))
    ensemble = torch.randn(6, 3, generator=g, dtype=torch.float64)
    observation = torch.tensor([0.3, float("nan"), -0.2], dtype=torch.float64)
    operator, error = Subset.all(3), ObservationError(std=0.5)
    plain = ETKF(members=6).analyse(ensemble, observation, operator, error)
    rotated = ETKF(members=6, rotate=True, inflation=1.1).analyse(ensemble, observation, operator, error, generator=g)
    torch.testing.assert_close(rotated.mean(0), plain.mean(0))
    anomalies, rotated_anomalies = plain - plain.mean(0), rotated - rotated.mean(0)
    torch.testing.assert_close(rotated_anomalies.T @ rotated_anomalies, 1.1**2 * anomalies.T @ anomalies)


def test_enkf_n_minimises_its_dual_cost():
    g = torch.Generator().manual_seed(3)
    for members, p in ((10, 3), (5, 40), (30, 40)):
        observed = torch.randn(members, p, generator=g, dtype=torch.float64)
        observed -= observed.mean(0)
        innovation = 2.0 * torch.randn(p, generator=g, dtype=torch.float64)
        _, s, vh = torch.linalg.svd(observed, full_matrices=False)
        s, projected = s.numpy(), (vh @ innovation).numpy()
        factor = enkf_n_inflation(s, projected, members)
        zeta = (members - 1) / factor**2
        grid = np.logspace(-6, 3, 20001) * (members - 1)
        costs = enkf_n_dual_cost(grid, s, projected, members)
        assert enkf_n_dual_cost(zeta, s, projected, members) <= costs.min() + 1e-9
        assert abs(math.log(zeta / grid[np.argmin(costs)])) < 2e-3


def test_assimilate_rejects_bad_setups(linear_twin):
    obs = linear_twin[0]
    with pytest.raises(InputError, match="members"):
        ETKF(members=1)
    with pytest.raises(InputError, match="inflation"):
        EnKF(members=10, inflation=0.0)
    with pytest.raises(InputError, match="radius"):
        LETKF(members=10, radius=-1.0)
    with pytest.raises(InputError, match="prior_mean"):
        ETKF(members=5).assimilate(linear_model, obs, DT)
    with pytest.raises(InputError, match="multiples of dt"):
        ETKF(members=5).assimilate(linear_model, obs, 0.03, prior_mean=ZERO, prior_spread=1.0)
    with pytest.raises(InputError, match="ensemble"):
        ETKF(members=5).assimilate(linear_model, obs, DT, ensemble=torch.zeros(4, 3))
    with pytest.raises(InputTypeError, match="observations"):
        ETKF(members=5).assimilate(linear_model, obs.values, DT, prior_mean=ZERO, prior_spread=1.0)
    with pytest.raises(InputError, match="positions"):
        LETKF(members=5, radius=2.0).analyse(torch.randn(5, 3, dtype=torch.float64), torch.zeros(2),
                                             Linear(torch.ones(2, 3, dtype=torch.float64)), ObservationError(std=1.0))


@pytest.mark.parametrize("method", [ETKF, EnKF])
@pytest.mark.parametrize("name, value, error", [
    ("prior_mean", "abc", InputTypeError),  # TypeError: new(): invalid data type 'str'
    ("prior_mean", [0.0, None, 0.0], InputTypeError),
    ("prior_mean", torch.zeros(3, dtype=torch.complex128), InputTypeError),  # the imaginary part was dropped
    ("prior_mean", torch.ones(3, dtype=torch.bool), InputTypeError),
    ("prior_spread", "x", InputTypeError),
    ("prior_spread", object(), InputTypeError),
    ("prior_spread", math.inf, InputError),  # accepted: the forecast then failed naming only 'trajectory'
    ("prior_spread", torch.tensor([1.0, math.nan, 1.0]), InputError),
])
def test_assimilate_refuses_a_prior_that_is_not_real_numbers(linear_twin, method, name, value, error):
    arguments = {"prior_mean": ZERO, "prior_spread": 1.0, name: value}
    with pytest.raises(error, match=f"{name}: expected"):
        method(members=5).assimilate(linear_model, linear_twin[0], DT, **arguments)


def test_assimilate_refuses_absurd_members_and_seeds_and_an_overflowing_prior(linear_twin):
    for members in (2**63, 2**70, MAX_MEMBERS + 1):  # RuntimeError from torch.randn when assimilating
        with pytest.raises(InputError, match="members: expected an integer in \\[2, 16777216\\]"):
            ETKF(members=members)
    with pytest.raises(InputError, match="members"):
        mean_preserving_rotation(2**63)
    with pytest.raises(InputError, match="seed: expected an integer >= 0"):
        EnKF(members=5, seed=2**70)  # accepted, then RuntimeError: Overflow when unpacking long
    huge = torch.full((3,), 3e38, dtype=torch.float32)
    with pytest.raises(InputError, match="prior_mean, prior_spread: the initial members .* overflow torch.float32"):
        ETKF(members=5).assimilate(linear_model, linear_twin[0], DT, prior_mean=huge, prior_spread=3e38)


def test_stochastic_enkf_is_reproducible_and_handles_nonlinear_operators(linear_twin):
    obs = linear_twin[0]
    first = EnKF(members=30, seed=5).assimilate(linear_model, obs, DT, prior_mean=ZERO, prior_spread=1.0)
    again = EnKF(members=30, seed=5).assimilate(linear_model, obs, DT, prior_mean=ZERO, prior_spread=1.0)
    torch.testing.assert_close(first.analysis_mean, again.analysis_mean, rtol=0, atol=0)
    cubic = Observations(obs.times, obs.values[:, [0]] ** 3, ObservationError(std=0.5),
                         Function(lambda x: x[..., :1] ** 3, obs_dim=1))
    for method in (EnKF(members=30), ETKF(members=30), EnKFN(members=30)):
        result = method.assimilate(linear_model, cubic, DT, prior_mean=ZERO, prior_spread=1.0)
        assert bool(torch.isfinite(result.analysis_mean).all())


def test_rmse_time_mean():
    estimate = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 2.0]])
    truth = torch.zeros(3, 2)
    assert rmse_time_mean(estimate, truth) == pytest.approx((math.sqrt(12.5) + 1.0 + math.sqrt(2.0)) / 3)
    assert rmse_time_mean(estimate, truth, burn_in=2) == pytest.approx(math.sqrt(2.0))
    with pytest.raises(InputError, match="burn_in"):
        rmse_time_mean(estimate, truth, burn_in=3)
    with pytest.raises(InputError, match="truth"):
        rmse_time_mean(estimate, truth[:2])


# --- chaotic benchmarks (DAPPER's reference scores) -----------------------------------------------------


@pytest.mark.slow
def test_etkf_on_lorenz63_sakov2012():
    """sakov2012 / DAPPER mods.Lorenz63.sakov2012: dt 0.01, all components every 25 steps, R = 2 I.

    DAPPER: EnKF('Sqrt', N=10, infl=1.02, rot=True) rmse.a = 0.60 over 1000 cycles. Here, 300
    cycles after a 50-cycle burn-in: 0.56 (twin seed 3); required well below the obs error sqrt(2).
    """
    model = geonn.Lorenz63()
    cycles = 300
    ds = twin_experiment(model, 0.01, 25 * cycles, Subset.all(3), ObservationError(std=math.sqrt(2.0)), every=25, seed=3)
    obs, truth = read_observations(ds), torch.as_tensor(ds.truth.values)
    prior = torch.as_tensor(ds.initial_truth.values)
    etkf = ETKF(members=10, inflation=1.02, rotate=True)
    result = etkf.assimilate(model, obs, 0.01, prior_mean=prior, prior_spread=math.sqrt(2.0))
    rmse = rmse_time_mean(result.analysis_mean, truth, burn_in=50)
    assert rmse < 0.75
    assert rmse_time_mean(result.forecast_mean, truth, burn_in=50) > rmse


@pytest.fixture(scope="module")
def lorenz96_twin():
    model = geonn.Lorenz96(40)
    ds = twin_experiment(model, 0.05, 200, Subset.all(40), ObservationError(std=1.0), every=1, spinup_steps=1000, seed=2)
    return model, read_observations(ds), torch.as_tensor(ds.truth.values), torch.as_tensor(ds.initial_truth.values)


def test_letkf_without_localisation_is_the_etkf(lorenz96_twin):
    model, obs, _, x0 = lorenz96_twin
    short = Observations(obs.times[:20], obs.values[:20], obs.error, obs.operator)
    kwargs = {"prior_mean": x0, "prior_spread": 1.0}
    letkf = LETKF(members=12, radius=math.inf, inflation=1.05, rotate=True).assimilate(model, short, 0.05, **kwargs)
    etkf = ETKF(members=12, inflation=1.05, rotate=True).assimilate(model, short, 0.05, **kwargs)
    torch.testing.assert_close(letkf.analysis_mean, etkf.analysis_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(letkf.analysis_spread, etkf.analysis_spread, rtol=1e-9, atol=1e-9)


def test_letkf_and_enkf_n_on_lorenz96(lorenz96_twin):
    """Lorenz-96 (40 variables, dt 0.05, all observed every step, R = I), 200 cycles, burn-in 50.

    DAPPER mods.Lorenz96.sakov2008 lists rmse.a 0.22 for LETKF(N=7, infl=1.04, rot, loc_rad=4; a
    Gaspari-Cohn radius of 1.82 * 4 here) and 0.21 for EnKF_N(N=24, rot); here 0.20 and 0.21. The
    ETKF with N=10 (below the ~14 unstable directions) diverges without localisation.
    """
    model, obs, truth, x0 = lorenz96_twin
    kwargs = {"prior_mean": x0, "prior_spread": 1.0}
    letkf = LETKF(members=10, radius=1.82 * 4, inflation=1.05).assimilate(model, obs, 0.05, **kwargs)
    assert rmse_time_mean(letkf.analysis_mean, truth, burn_in=50) < 0.35
    enkf_n = EnKFN(members=25).assimilate(model, obs, 0.05, **kwargs)
    assert rmse_time_mean(enkf_n.analysis_mean, truth, burn_in=50) < 0.35
    assert enkf_n.inflation.shape == (200,) and bool((enkf_n.inflation > 0.9).all())


@pytest.mark.parametrize("seed", [-1, 2**63, 2**70, 1.5, True])
def test_twin_refuses_a_seed_torch_cannot_take(seed):
    with pytest.raises(InputError, match=r"seed: expected an integer in \[0, 2\*\*63\)"):
        twin_experiment(geonn.Lorenz63(), 0.01, 10, Subset.all(3), ObservationError(std=1.0), every=5, seed=seed)
