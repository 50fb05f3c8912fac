"""forecast_rmse and lyapunov_max against exact answers (linear systems) and known exponents (Lorenz)."""

from __future__ import annotations

import math

import pytest
import torch

import geonn
from geonn import InputError, InputTypeError
from geonn.errors import NonFiniteError
from geonn.metrics import forecast_rmse, lyapunov_max

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Linear(torch.nn.Module):
    """dx/dt = A x."""

    def __init__(self, matrix):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(matrix, dtype=DTYPE))
        self.state_dim = self.A.shape[0]

    def forward(self, t, x):
        return x @ self.A.T


def rk4_factor(z: float) -> float:
    """The classic RK4 step's amplification of dx/dt = lambda x, z = lambda dt."""
    return 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24


def lorenz63_truth(n_steps=400, dt=0.01):
    return torch.as_tensor(geonn.simulate(geonn.Lorenz63(), n_steps, dt, spinup_steps=500).state.values)


# --- forecast_rmse -------------------------------------------------------------------------------


def test_forecast_rmse_of_the_true_model_is_zero():
    truth = lorenz63_truth()
    rmse = forecast_rmse(geonn.Lorenz63(), truth, 0.01, leads=(1, 4, 8, 50))
    assert list(rmse) == [1, 4, 8, 50]
    assert all(value < 1e-12 for value in rmse.values()), rmse


def test_forecast_rmse_of_a_perturbed_model_grows_with_lead():
    truth = lorenz63_truth()
    leads = (1, 2, 4, 8, 16, 32, 64)
    rmse = forecast_rmse(geonn.Lorenz63(rho=28.5), truth, 0.01, leads=leads)
    values = [rmse[k] for k in leads]
    assert values == sorted(values) and values[0] > 1e-5
    assert values[-1] > 20 * values[0]
    # a larger perturbation gives larger errors at every lead
    worse = forecast_rmse(geonn.Lorenz63(rho=30.0), truth, 0.01, leads=leads)
    assert all(worse[k] > rmse[k] for k in leads)


def test_forecast_rmse_matches_the_exact_error_of_a_linear_model():
    """For dx/dt = a x the truth (RK4) is x_i = x_0 g_a^i; a model b forecasts x_i g_b^k, so the RMSE at
    lead k over starts i < n - max(lead) is |g_b^k - g_a^k| * rms(x_i) exactly."""
    a, b, dt, n = -0.3, -0.25, 0.1, 60
    g_a, g_b = rk4_factor(a * dt), rk4_factor(b * dt)
    x0 = torch.tensor([1.5, -2.0], dtype=DTYPE)
    truth = geonn.rollout(Linear([[a, 0.0], [0.0, a]]), x0, n, dt)
    leads = (1, 3, 10)
    rmse = forecast_rmse(Linear([[b, 0.0], [0.0, b]]), truth, dt, leads=leads)
    starts = truth[: n + 1 - max(leads)]
    rms = float(starts.pow(2).mean().sqrt())
    for k in leads:
        assert rmse[k] == pytest.approx(abs(g_b**k - g_a**k) * rms, rel=1e-10)


def test_forecast_rmse_does_not_depend_on_the_batch_size():
    truth = lorenz63_truth(200)
    model = geonn.Lorenz63(rho=29.0)
    whole = forecast_rmse(model, truth, 0.01, leads=(1, 5), batch_size=4096)
    pieces = forecast_rmse(model, truth, 0.01, leads=(1, 5), batch_size=7)
    for k in (1, 5):
        assert pieces[k] == pytest.approx(whole[k], rel=1e-12)


def test_forecast_rmse_scheme_matters():
    truth = lorenz63_truth(200)
    rk4 = forecast_rmse(geonn.Lorenz63(), truth, 0.01, leads=(1,), scheme="rk4")[1]
    euler = forecast_rmse(geonn.Lorenz63(), truth, 0.01, leads=(1,), scheme="euler")[1]
    assert rk4 < 1e-12
    assert euler > 1e-4


@pytest.mark.parametrize(
    "leads, message",
    [
        ((), "leads: expected lead times >= 1"),
        ((0, 1), "leads: expected lead times >= 1"),
        ((-2,), "leads"),
        ((1, 10), r"truth: expected more than 10 times for lead 10, got 10"),
    ],
)
def test_forecast_rmse_refuses_bad_leads(leads, message):
    truth = lorenz63_truth(9)  # 10 times
    with pytest.raises(InputError, match=message):
        forecast_rmse(geonn.Lorenz63(), truth, 0.01, leads=leads)


def test_forecast_rmse_longest_possible_lead():
    truth = lorenz63_truth(9)
    assert forecast_rmse(geonn.Lorenz63(), truth, 0.01, leads=(9,))[9] < 1e-12  # one start left


@pytest.mark.parametrize(
    "truth",
    [torch.zeros(10, dtype=DTYPE), torch.zeros(10, 2, 3, dtype=DTYPE), [[0.0, 1.0, 2.0]] * 10, None],
)
def test_forecast_rmse_refuses_bad_truth(truth):
    with pytest.raises(InputError, match=r"truth: expected a tensor of shape \(time, state_dim\)"):
        forecast_rmse(geonn.Lorenz63(), truth, 0.01)


def test_forecast_rmse_refuses_a_truth_of_the_wrong_dimension():
    with pytest.raises(InputError, match="x0: expected last dimension 3"):
        forecast_rmse(geonn.Lorenz63(), torch.zeros(10, 4, dtype=DTYPE), 0.01)


# --- forecast_rmse: bugs the fuzz found (tests/test_fuzz.py, issue 7) -------------------------------


def squaring(t, x):
    """dx/dt = 1e4 x^2: a learned model gone wrong, infinite within a few steps of dt = 0.01."""
    return 1e4 * x * x


def test_forecast_rmse_of_a_diverged_model_raises_naming_the_start_and_lead():
    truth = lorenz63_truth(9)
    with pytest.raises(NonFiniteError, match=r"f: the forecast from truth\[\d+\] became non-finite .* at step \d+ \(lead") as err:
        forecast_rmse(squaring, truth, 0.01, leads=(2,))  # it returned {2: inf}
    assert err.value.step in (1, 2) and err.value.time == pytest.approx(0.01 * err.value.step)


def test_forecast_rmse_keeps_going_when_asked_and_flags_the_diverged_leads():
    truth = lorenz63_truth(9)
    rmse = forecast_rmse(squaring, truth, 0.01, leads=(2,), nonfinite="keep")
    assert rmse == {2: math.inf}
    with pytest.raises(InputError, match="nonfinite: expected 'raise' or 'keep'"):
        forecast_rmse(squaring, truth, 0.01, nonfinite="warn")


def test_forecast_rmse_of_errors_too_large_to_square_raises():
    truth = lorenz63_truth(9)
    with pytest.raises(NonFiniteError, match="f: the squared forecast errors at lead 1 overflow float64"):
        forecast_rmse(lambda t, x: torch.full_like(x, 1e200), truth, 0.01, leads=(1,), scheme="euler")  # it returned inf


@pytest.mark.parametrize("leads", [None, 3, "ab", [1.5], [True], b"\x01"])
def test_forecast_rmse_refuses_leads_that_are_not_integers(leads):
    with pytest.raises(InputTypeError, match="leads: expected"):  # TypeError: 'int' object is not iterable, ...
        forecast_rmse(geonn.Lorenz63(), lorenz63_truth(9), 0.01, leads=leads)


def test_forecast_rmse_refuses_a_truth_with_nan():
    truth = lorenz63_truth(9)
    truth[-1, 0] = math.nan  # a target only: the RMSE was NaN
    with pytest.raises(InputError, match="truth: expected finite values, got 1 NaN or inf"):
        forecast_rmse(geonn.Lorenz63(), truth, 0.01, leads=(1,))


# --- lyapunov_max: exact cases ---------------------------------------------------------------------


@pytest.mark.parametrize("rate", [-0.3, 0.0, 0.7])
def test_lyapunov_of_scalar_linear_flow_is_exact(rate):
    """In one dimension the separation is multiplied by the RK4 factor every step: no transient at all."""
    dt, n = 0.05, 200
    estimate, per_trajectory = lyapunov_max(Linear([[rate]]), torch.zeros(3, 1, dtype=DTYPE), dt, n_steps=n, spinup_steps=0)
    expected = math.log(rk4_factor(rate * dt)) / dt
    assert per_trajectory.shape == (3,)
    assert estimate == pytest.approx(expected, abs=1e-9)
    assert torch.allclose(per_trajectory, torch.full((3,), expected, dtype=torch.float64), atol=1e-9, rtol=0)
    assert abs(expected - rate) < 1e-6  # and RK4 at this step is close to the exact rate


@pytest.mark.parametrize("eigenvalues, largest", [((-1.0, 0.5), 0.5), ((-1.0, -2.0), -1.0), ((0.5, -0.2, -3.0), 0.5)])
def test_lyapunov_of_linear_flow_is_the_largest_real_part(eigenvalues, largest):
    """At a fixed point the separation evolves exactly linearly: after n steps its log growth is
    n log g + log|c| (g the RK4 factor of the leading eigenvalue, c the random start's component along
    its eigenvector), so the estimate is the exponent up to log|c| / T <= 0, and two runs of n and 2n
    steps (same seed, same start) cancel that term exactly."""
    dt, n = 0.1, 800
    a = torch.diag(torch.tensor(eigenvalues, dtype=DTYPE))
    rotation = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    )[0]
    system = Linear(rotation @ a @ rotation.T)  # the same spectrum in rotated coordinates
    x0 = torch.zeros(4, len(eigenvalues), dtype=DTYPE)
    short, _ = lyapunov_max(system, x0, dt, n_steps=n, spinup_steps=0)
    estimate, per_trajectory = lyapunov_max(system, x0, dt, n_steps=2 * n, spinup_steps=0)
    discrete = math.log(rk4_factor(largest * dt)) / dt
    assert abs(discrete - largest) < 1e-5  # RK4 at dt = 0.1
    assert abs(estimate - largest) < 2e-2  # T = 160
    assert bool((per_trajectory <= discrete + 1e-12).all())
    assert 2 * estimate - short == pytest.approx(discrete, abs=1e-9)


def test_lyapunov_of_a_single_state_and_seed():
    system = Linear([[0.2, 0.0], [0.0, -0.5]])
    estimate, per_trajectory = lyapunov_max(system, torch.zeros(2, dtype=DTYPE), 0.1, n_steps=1000, spinup_steps=0)
    assert per_trajectory.shape == () and estimate == float(per_trajectory)
    assert estimate == pytest.approx(0.2, abs=1e-2)
    again, _ = lyapunov_max(system, torch.zeros(2, dtype=DTYPE), 0.1, n_steps=1000, spinup_steps=0)
    assert again == estimate  # seeded


def test_lyapunov_refuses_bad_input():
    with pytest.raises(InputTypeError, match="x0: expected a floating-point tensor"):
        lyapunov_max(geonn.Lorenz63(), torch.tensor([1, 2, 3]), 0.01)
    with pytest.raises(InputTypeError, match="x0"):
        lyapunov_max(geonn.Lorenz63(), [1.0, 2.0, 3.0], 0.01)
    with pytest.raises(InputError, match="n_steps: expected >= 1, got 0"):
        lyapunov_max(geonn.Lorenz63(), torch.ones(3, dtype=DTYPE), 0.01, n_steps=0)


def test_lyapunov_reports_divergence():
    blow_up = Linear([[2000.0]])  # x grows by ~7e7 a step and overflows to inf
    with pytest.raises(InputError, match="f: the Lyapunov estimate is not finite"):
        lyapunov_max(blow_up, torch.ones(1, dtype=DTYPE), 0.1, n_steps=300, spinup_steps=0)


@pytest.mark.parametrize("name, value", [("n_steps", 2.5), ("n_steps", "10"), ("n_steps", None), ("spinup_steps", 1.5),
                                         ("spinup_steps", -1), ("seed", "x"), ("n_steps", 2**40)])
def test_lyapunov_refuses_step_counts_that_are_not_integers(name, value):
    with pytest.raises((InputError, InputTypeError), match=f"{name}: expected"):  # bare TypeErrors, or naming n_steps
        lyapunov_max(geonn.Lorenz63(), torch.ones(3, dtype=DTYPE), 0.01, **{"n_steps": 5, "spinup_steps": 0, name: value})


@pytest.mark.parametrize("dt", [0.0, -0.01, math.nan, "0.01"])
def test_lyapunov_refuses_a_bad_dt(dt):
    with pytest.raises((InputError, InputTypeError), match="dt: expected"):  # dt = 0 returned NaN or inf
        lyapunov_max(geonn.Lorenz63(), torch.ones(3, dtype=DTYPE), dt, n_steps=1, spinup_steps=0)


def test_lyapunov_refuses_empty_or_huge_states_and_names_the_diverged_step():
    with pytest.raises(InputError, match="x0: expected a non-empty state"):  # returned NaN
        lyapunov_max(geonn.Lorenz63(), torch.ones(0, 3, dtype=DTYPE), 0.01, n_steps=1, spinup_steps=0)
    with pytest.raises(NonFiniteError, match="x0: the states are too large to perturb"):
        lyapunov_max(geonn.Lorenz63(), torch.full((3,), 1e300, dtype=DTYPE), 0.01, n_steps=1, spinup_steps=0)
    with pytest.raises(NonFiniteError, match=r"at step \d+ after the spin-up") as err:
        lyapunov_max(squaring, torch.ones(3, dtype=DTYPE), 0.01, n_steps=20, spinup_steps=0)
    assert 1 <= err.value.step <= 20


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_metrics_keep_to_the_device_and_dtype_of_their_input(device):
    """Their working tensors were made on the CPU whatever the input's device."""
    from geonn.metrics import crps_gaussian

    model = Linear([[0.2]]).float().to(device)
    estimate, per_trajectory = lyapunov_max(model, torch.zeros(2, 1, device=device), 0.1, n_steps=50, spinup_steps=0)
    assert per_trajectory.dtype == torch.float64 and per_trajectory.device.type == device
    assert estimate == pytest.approx(0.2, abs=1e-3)
    score = crps_gaussian(torch.zeros(3, device=device), torch.ones(3, device=device), torch.zeros(3, device=device))
    assert score.device.type == device and score.dtype == torch.float32


# --- lyapunov_max: chaotic systems -----------------------------------------------------------------


@pytest.mark.slow
def test_lyapunov_of_lorenz63():
    """The largest exponent of Lorenz-63 (sigma 10, rho 28, beta 8/3) is about 0.9056."""
    model = geonn.Lorenz63()
    starts = torch.as_tensor(geonn.simulate(model, 3000, 0.01, spinup_steps=1000).state.values[::200])  # 16 states
    estimate, per_trajectory = lyapunov_max(model, starts, 0.01, n_steps=6000, spinup_steps=200)
    assert per_trajectory.shape == (16,)
    assert estimate == pytest.approx(0.9056, abs=0.05)
    assert float(per_trajectory.min()) > 0.6 and float(per_trajectory.max()) < 1.2


@pytest.mark.slow
def test_lyapunov_of_lorenz96():
    """Lorenz-96 with n = 40 and F = 8 has a largest exponent of about 1.7 (per model time unit)."""
    model = geonn.Lorenz96(40, 8.0)
    starts = torch.as_tensor(geonn.simulate(model, 1500, 0.05, spinup_steps=500).state.values[::500])  # 4 states
    estimate, _ = lyapunov_max(model, starts, 0.05, n_steps=1500, spinup_steps=0)
    assert estimate == pytest.approx(1.69, abs=0.12)
