"""CRPS of ensembles (fair and empirical) against a brute-force double sum and the Gaussian closed form;
the Gaussian closed form against numerical integration; coverage of predicted Gaussian regions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from geonn import InputError, InputTypeError
from geonn.metrics import crps_ensemble, crps_gaussian, gaussian_coverage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DTYPE = torch.float64


def brute_force_crps(members: np.ndarray, y: float, fair: bool) -> float:
    """``mean_i |x_i - y| - sum_{i,j} |x_i - x_j| / (2 m (m - 1) or 2 m^2)``, by explicit loops (properscoring's definition)."""
    m = len(members)
    skill = sum(abs(x - y) for x in members) / m
    pairs = sum(abs(a - b) for a in members for b in members)
    return skill - pairs / (2 * (m * (m - 1) if fair else m * m))


@pytest.mark.parametrize("fair", [True, False])
@pytest.mark.parametrize("m", [2, 3, 7, 20])
def test_crps_ensemble_matches_the_double_sum(m, fair):
    generator = torch.Generator().manual_seed(m)
    ensemble = torch.randn(m, 4, 3, generator=generator, dtype=DTYPE) * 2 + 1
    observation = torch.randn(4, 3, generator=generator, dtype=DTYPE)
    ensemble[1, 0, 0] = ensemble[0, 0, 0]  # ties are fine
    got = crps_ensemble(ensemble, observation, fair=fair)
    assert got.shape == observation.shape
    for i in range(4):
        for j in range(3):
            expected = brute_force_crps(ensemble[:, i, j].tolist(), float(observation[i, j]), fair)
            assert float(got[i, j]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_crps_of_a_point_forecast_is_the_absolute_error():
    point = torch.tensor([[1.0, -2.0, 0.5]], dtype=DTYPE)
    observation = torch.tensor([0.0, 1.0, 0.5], dtype=DTYPE)
    assert torch.equal(crps_ensemble(point, observation, fair=False), (point[0] - observation).abs())


@pytest.mark.parametrize("mean, std, y", [(0.0, 1.0, 0.3), (2.0, 0.5, -1.0), (-1.0, 3.0, 4.0)])
def test_crps_gaussian_matches_the_integral_of_the_squared_cdf_difference(mean, std, y):
    cdf = stats.norm(mean, std).cdf
    below, _ = integrate.quad(lambda z: cdf(z) ** 2, -np.inf, y)
    above, _ = integrate.quad(lambda z: (1 - cdf(z)) ** 2, y, np.inf)
    got = crps_gaussian(torch.tensor(mean, dtype=DTYPE), torch.tensor(std, dtype=DTYPE), torch.tensor(y, dtype=DTYPE))
    assert float(got) == pytest.approx(below + above, rel=1e-8)


def test_fair_crps_is_unbiased_and_the_empirical_one_is_not():
    # Many 4-member ensembles from N(0, 1) verified at fixed y: the fair CRPS averages to the Gaussian
    # closed form, the empirical one exceeds it by E|X - X'| / (2 m) = 1 / (sqrt(pi) m).
    m, n = 4, 200_000
    generator = torch.Generator().manual_seed(0)
    ensemble = torch.randn(m, n, generator=generator, dtype=DTYPE)
    y = torch.full((n,), 0.7, dtype=DTYPE)
    exact = float(crps_gaussian(torch.zeros((), dtype=DTYPE), torch.ones((), dtype=DTYPE), torch.tensor(0.7, dtype=DTYPE)))
    fair = crps_ensemble(ensemble, y)
    empirical = crps_ensemble(ensemble, y, fair=False)
    tolerance = 4 * float(fair.std()) / math.sqrt(n)
    assert float(fair.mean()) == pytest.approx(exact, abs=tolerance)
    assert float(empirical.mean()) == pytest.approx(exact + 1 / (math.sqrt(math.pi) * m), abs=tolerance)


@pytest.mark.parametrize(
    "ensemble, observation, kwargs, error, message",
    [
        (torch.zeros(5, 3), torch.zeros(4), {}, InputError, r"ensemble: expected shape \(members, \*observation.shape\)"),
        (torch.zeros(1, 3), torch.zeros(3), {}, InputError, r"at least 2 members for fair=True, got 1"),
        (torch.zeros(0, 3), torch.zeros(3), {"fair": False}, InputError, r"at least 1 members"),
        (torch.full((3, 2), float("nan")), torch.zeros(2), {}, InputError, r"ensemble: expected finite values"),
        (torch.zeros(3, 2), torch.tensor([0.0, float("inf")]), {}, InputError, r"observation: expected finite values"),
        (np.zeros((3, 2)), torch.zeros(2), {}, InputTypeError, r"ensemble: expected a floating-point torch.Tensor"),
        (torch.zeros(3, 2, dtype=torch.long), torch.zeros(2), {}, InputTypeError, r"ensemble: expected a floating-point"),
    ],
)
def test_crps_ensemble_refuses_bad_input(ensemble, observation, kwargs, error, message):
    with pytest.raises(error, match=message):
        crps_ensemble(ensemble, observation, **kwargs)


def test_crps_gaussian_refuses_a_non_positive_std():
    with pytest.raises(InputError, match=r"std: expected values > 0, got a minimum of 0"):
        crps_gaussian(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.zeros(2))


def test_gaussian_coverage_is_the_nominal_level_for_calibrated_residuals():
    generator = torch.Generator().manual_seed(1)
    factor = torch.tensor([[2.0, 0.0, 0.0], [0.5, 1.0, 0.0], [-1.0, 0.3, 0.2]], dtype=DTYPE)
    residual = torch.randn(100_000, 3, generator=generator, dtype=DTYPE) @ factor.T
    coverage = gaussian_coverage(residual, factor, (0.1, 0.5, 0.9, 0.99))
    for level, fraction in coverage.items():
        assert fraction == pytest.approx(level, abs=4 * math.sqrt(level * (1 - level) / 100_000))
    # a covariance twice too small in std covers far less; one per sample broadcasts
    assert gaussian_coverage(residual, factor / 2, (0.9,))[0.9] < 0.5
    assert gaussian_coverage(residual, factor.expand(100_000, 3, 3), (0.9,)) == gaussian_coverage(residual, factor, (0.9,))


@pytest.mark.parametrize(
    "residual, factor, levels, message",
    [
        (torch.zeros(5, 2), torch.eye(2), (0.0,), r"levels: expected probabilities in \(0, 1\)"),
        (torch.zeros(5, 2), torch.eye(2), (), r"levels: expected probabilities"),
        (torch.zeros(5, 2), torch.diag(torch.tensor([1.0, 0.0])), (0.9,), r"not positive definite"),
        (torch.zeros(5, 2), torch.eye(3), (0.9,), r"scale_tril: expected shape \(\.\.\., 2, 2\)"),
        (torch.zeros(0, 2), torch.eye(2), (0.9,), r"residual: expected at least one sample"),
        (torch.zeros(5, 2), torch.eye(2).expand(4, 2, 2), (0.9,), r"scale_tril: expected batch dimensions broadcastable"),
    ],
)
def test_gaussian_coverage_refuses_bad_input(residual, factor, levels, message):
    with pytest.raises(InputError, match=message):
        gaussian_coverage(residual.double(), factor.double(), levels)
