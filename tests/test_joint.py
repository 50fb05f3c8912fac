"""Joint estimation of states and a learned tendency (geonn.joint): the normal equations against autograd in
float64, state recovery under known dynamics, exact observations held, the Laplace covariance's scaling,
bit-for-bit resume, and bad input refused with messages naming the argument."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.ndimage import gaussian_filter1d

import geonn
from geonn import InputError, InputTypeError
from geonn.integrators import RungeKuttaStep
from geonn.joint import JointConfig, _prepare, estimate_jointly, forecast_spread, joint_cost, parameter_covariance
from geonn.metrics import forecast_rmse
from geonn.operators import BilinearResidual, Standardised
from geonn.training import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(dim: int = 3, seed: int = 0) -> Standardised:
    torch.manual_seed(seed)
    return Standardised(BilinearResidual(dim).double(), torch.zeros(dim), torch.ones(dim), torch.ones(dim))


@pytest.fixture(scope="module")
def lorenz_noisy():
    truth = torch.as_tensor(geonn.simulate(geonn.Lorenz63(), 400, 0.01, spinup_steps=500).state.values)
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return truth, truth + noise


def test_normal_equations_match_autograd_in_float64():
    """J^T J and J^T r from per-transition Jacobians equal those of the full autograd Jacobian, with two
    windows, held (exact) entries, missing entries, per-component scales and a multi-step horizon."""
    model = small_model()
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(2, 7, 3, generator=generator, dtype=torch.float64)
    observations = torch.randn(2, 7, 3, generator=generator, dtype=torch.float64)
    mask = torch.rand(2, 7, 3, generator=generator) < 0.6
    obs_std = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)  # component 0: exact, held where observed
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    problem, states, _ = _prepare(model, observations, 0.05, mask, states, obs_std, scale, RungeKuttaStep("rk4"), [1, 3], True)
    theta = problem.theta()
    states_block, coupling, params_block, gradient = problem.normal_equations(states, theta, 0.1)
    free = problem.free

    def residuals(vector):
        x = states.reshape(-1).index_put((free.reshape(-1).nonzero().squeeze(1),), vector[: problem.n_states]).reshape(states.shape)
        parts = [((x - problem.observations) * problem.obs_weight)[problem.weighted]]
        for k in (1, 3):
            forecast = torch.func.vmap(problem.flat.phi(k), in_dims=(None, 0))(vector[problem.n_states:], x[:, :-k].reshape(-1, 3))
            parts.append(((x[:, k:].reshape(-1, 3) - forecast) / (0.1 * math.sqrt(k) * scale)).reshape(-1))
        return torch.cat(parts)

    vector = torch.cat((states[free], theta))
    jac = torch.autograd.functional.jacobian(residuals, vector, vectorize=True)
    normal, grad = jac.T @ jac, jac.T @ residuals(vector)
    n = problem.n_states
    tol = 1e-12 * float(normal.abs().max())
    assert torch.allclose(torch.as_tensor(states_block.toarray()), normal[:n, :n], rtol=0, atol=tol)
    assert torch.allclose(torch.as_tensor(coupling), normal[:n, n:], rtol=0, atol=tol)
    assert torch.allclose(torch.as_tensor(params_block), normal[n:, n:], rtol=0, atol=tol)
    assert torch.allclose(torch.as_tensor(gradient), grad, rtol=0, atol=1e-12 * float(grad.abs().max()))
    # the cost is half the squared residuals
    total = joint_cost(model, states, observations, 0.05, mask=mask, obs_std=obs_std, dynamics_scale=scale, model_std=0.1,
                       horizons=(1, 3))
    assert total["total"] == pytest.approx(0.5 * float(residuals(vector).pow(2).sum()), rel=1e-12)
    assert total["observation"] + total["dynamics"] == pytest.approx(total["total"], rel=1e-12)


def test_known_dynamics_recover_states_much_better_than_the_observations(lorenz_noisy):
    truth, noisy = lorenz_noisy
    config = JointConfig(model_std=[1e-1, 1e-3], iterations=10, train_model=False)
    result = estimate_jointly(geonn.Lorenz63(), noisy, 0.01, config=config, progress=False)
    interior = slice(20, -20)  # the ends are constrained from one side only
    error = (result.states - truth)[interior].pow(2).mean().sqrt()
    assert error < (noisy - truth)[interior].pow(2).mean().sqrt() / 10
    assert result.states.shape == noisy.shape and len(result.history) == 2
    assert result.history[-1]["dynamics_cost"] < result.history[0]["dynamics_cost"] * 100  # consistent with the dynamics


@pytest.mark.slow
def test_states_and_model_learned_together_beat_the_smoothed_start(lorenz_noisy):
    truth, noisy = lorenz_noisy
    smooth = torch.as_tensor(gaussian_filter1d(noisy.numpy(), 3.0, axis=0, mode="nearest"))
    torch.manual_seed(0)
    model = Standardised(BilinearResidual(3).double(), smooth.mean(0), smooth.std(0), ((smooth[1:] - smooth[:-1]) / 0.01).std(0))
    fit(model, smooth, 0.01, config=TrainConfig(epochs=0, refine="lm", refine_epochs=1, refine_iterations=20), progress=False)
    before = forecast_rmse(model, truth, 0.01, (1,))[1]
    result = estimate_jointly(model, noisy, 0.01, states=smooth, config=JointConfig(model_std=[1e-1, 1e-2, 1e-3], iterations=8),
                              progress=False)
    interior = slice(20, -20)
    assert (result.states - truth)[interior].pow(2).mean() < (smooth - truth)[interior].pow(2).mean() / 4
    assert forecast_rmse(model, truth, 0.01, (1,))[1] < before / 1.5


def test_exact_observations_are_held_and_latents_move():
    truth = torch.as_tensor(geonn.simulate(geonn.Lorenz63(), 120, 0.01, spinup_steps=500).state.values)
    observations = truth.clone()
    observations[:, 1:] = math.nan
    start = truth.clone()
    start[:, 1:] += 0.5 * torch.randn(start[:, 1:].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = estimate_jointly(geonn.Lorenz63(), observations, 0.01, states=start, obs_std=0.0,
                              config=JointConfig(model_std=[1e-3], iterations=10, train_model=False), progress=False)
    assert torch.equal(result.states[:, 0], truth[:, 0])
    assert (result.states - truth)[10:-10, 1:].abs().max() < 0.5 * (start - truth)[10:-10, 1:].abs().max()


def test_laplace_covariance_scales_with_the_error_stds(lorenz_noisy):
    """Scaling every error std by 2 scales the Jacobian by 1/2, so the covariance by 4 (exactly)."""
    truth, noisy = lorenz_noisy
    model = small_model()
    states = truth[:100]
    base = parameter_covariance(model, states, noisy[:100], 0.01, obs_std=1.0, model_std=1e-2)
    scaled = parameter_covariance(model, states, noisy[:100], 0.01, obs_std=2.0, model_std=2e-2)
    assert base.shape == (57, 57) and torch.allclose(base, base.T)
    assert torch.linalg.eigvalsh(base).min() > -1e-10 * float(base.abs().max())
    assert torch.allclose(scaled, 4 * base, rtol=1e-6, atol=1e-12 * float(base.abs().max()))
    spread = forecast_spread(model, base, truth[:50], 0.01)
    assert math.isfinite(spread) and spread > 0
    assert forecast_spread(model, scaled, truth[:50], 0.01) == pytest.approx(2 * spread, rel=1e-5)
    with pytest.raises(InputError, match=r"covariance: expected shape \(57, 57\)"):
        forecast_spread(model, base[:3, :3], truth[:50], 0.01)


def test_resume_after_an_interruption_is_bit_for_bit(lorenz_noisy, tmp_path, monkeypatch):
    _, noisy = lorenz_noisy
    config = JointConfig(model_std=[1e-1, 1e-2, 1e-3], iterations=3)
    reference_model = small_model()
    reference = estimate_jointly(reference_model, noisy[:150], 0.01, config=config, checkpoint_dir=tmp_path / "a", progress=False)

    import geonn.joint as joint_module

    saves = []
    original = joint_module.save_checkpoint

    def save_then_stop(state, path):
        original(state, path)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(joint_module, "save_checkpoint", save_then_stop)
    model = small_model()
    with pytest.raises(KeyboardInterrupt):
        estimate_jointly(model, noisy[:150], 0.01, config=config, checkpoint_dir=tmp_path / "b", progress=False)
    model = small_model(seed=5)  # different weights: the checkpoint must restore them
    resumed = estimate_jointly(model, noisy[:150], 0.01, config=config, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.resumed_from_epoch == 1
    assert torch.equal(resumed.states, reference.states)
    for a, b in zip(model.state_dict().values(), reference_model.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["cost"] for h in resumed.history] == [h["cost"] for h in reference.history]
    with pytest.raises(InputError, match=r"another joint config \(iterations: 3 -> 4\)"):
        estimate_jointly(model, noisy[:150], 0.01, config=JointConfig(model_std=[1e-1, 1e-2, 1e-3], iterations=4),
                         checkpoint_dir=tmp_path / "b", resume=True, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"observations": torch.zeros(10, 3, dtype=torch.int64)}, InputTypeError, r"observations: expected a floating-point tensor"),
        ({"observations": torch.zeros(10)}, InputError, r"observations: expected shape \(time, state_dim\)"),
        ({"observations": torch.zeros(1, 3)}, InputError, r"with at least 2 times, got \(1, 3\)"),
        ({"observations": torch.full((10, 3), math.nan)}, InputError, r"mask: expected at least one observed entry"),
        ({"observations": torch.zeros(10, 4)}, InputError, r"observations: expected last dimension 3 for the model"),
        ({"mask": torch.ones(3)}, InputTypeError, r"mask: expected a boolean tensor"),
        ({"mask": torch.ones(4, dtype=torch.bool)}, InputError, r"mask: expected a shape broadcastable to \(10, 3\), got \(4,\)"),
        ({"mask": torch.tensor([True, False, False])}, InputError, r"states: some entries are not observed"),
        ({"states": torch.zeros(9, 3)}, InputError, r"states: expected initial states of shape \(10, 3\)"),
        ({"states": torch.full((10, 3), math.inf)}, InputError, r"states: expected finite initial states"),
        ({"obs_std": -1.0}, InputError, r"obs_std: expected finite values >= 0"),
        ({"obs_std": torch.ones(2)}, InputError, r"obs_std: expected a number or a tensor of shape \(3,\)"),
        ({"dynamics_scale": 0.0}, InputError, r"dynamics_scale: expected finite values > 0"),
        ({"dt": 0.0}, InputError, r"dt: expected a positive step"),
        ({"model": lambda t, x: x}, InputTypeError, r"model: expected a torch.nn.Module"),
        ({"resume": True}, InputError, r"resume: resuming needs checkpoint_dir"),
    ],
)
def test_bad_input_is_refused(kwargs, error, message):
    arguments = {"model": geonn.Lorenz63(), "observations": torch.zeros(10, 3, dtype=torch.float64), "dt": 0.01,
                 "config": JointConfig(model_std=[1e-2], iterations=1), "progress": False}
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        estimate_jointly(arguments.pop("model"), arguments.pop("observations"), arguments.pop("dt"), **arguments)


def test_nan_where_observed_is_refused():
    observations = torch.zeros(10, 3, dtype=torch.float64)
    observations[3, 1] = math.nan
    with pytest.raises(InputError, match=r"observations: expected finite values where observed"):
        estimate_jointly(geonn.Lorenz63(), observations, 0.01, mask=torch.ones(3, dtype=torch.bool), progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_std": []}, r"model_std: expected a non-empty list of positive numbers"),
        ({"model_std": [1e-2, 0.0]}, r"model_std: expected a non-empty list of positive numbers"),
        ({"iterations": 0}, r"iterations: expected an integer >= 1"),
        ({"epochs_per_stage": 0}, r"epochs_per_stage: expected an integer >= 1"),
        ({"horizons": [0]}, r"horizons: expected a non-empty list of integers >= 1"),
        ({"horizons": [1, 1]}, r"horizons: expected distinct horizons"),
        ({"tolerance": -1.0}, r"tolerance: expected a positive number"),
        ({"train_model": 1}, r"train_model: expected true or false"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        JointConfig(**kwargs)
