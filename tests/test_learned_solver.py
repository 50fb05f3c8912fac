"""The learned variational solver (4DVarNet) and the window baselines: windows and their observations,
the first guess, window 4D-Var and EnKS (the EnKS equals geonn's EnKS, 4D-Var recovers noise-free
truths), the solver's iterations lower the cost, training lowers the loss, an interrupted training
resumes bit for bit, and the lorenz63-4dvarnet case runs on a reduced setting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import geonn
from geonn import InputError, NotFittedError
from geonn.assimilation import EnKS, ObservationError, Observations, Subset
from geonn.assimilation import learned as learned_module
from geonn.assimilation.learned import DynamicalPrior, GradientLSTM, LearnedSolver, SolverTrainConfig
from geonn.assimilation.windows import (
    WindowEnKS,
    WindowVar4D,
    cut_windows,
    interpolate_observations,
    observation_mask,
    observe_windows,
    window_rmse,
)
from geonn.cases import check_expected, load_case, run_case

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGMA = math.sqrt(2.0)


def lorenz_windows(n_windows: int, steps: int, seed: int = 0) -> torch.Tensor:
    model = geonn.Lorenz63().double()
    generator = torch.Generator().manual_seed(seed)
    x0 = model.default_initial_state() + torch.randn(n_windows, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        trajectory = geonn.rollout(model, x0, 500 + steps - 1, 0.01)[500:]
    return cut_windows(trajectory, steps, steps)


# --- windows, observations and the first guess -------------------------------------------------------------


def test_cut_windows_and_their_observations():
    trajectory = torch.arange(2 * 10 * 3, dtype=torch.float64).reshape(10, 2, 3)  # (time, runs, D)
    windows = cut_windows(trajectory, 4, 3)
    assert windows.shape == (6, 4, 3)  # 3 windows per run, run 0 first
    assert torch.equal(windows[0], trajectory[0:4, 0]) and torch.equal(windows[1], trajectory[3:7, 0])
    assert torch.equal(windows[3], trajectory[0:4, 1])
    mask = observation_mask(20, 3, every=4, edge=3)
    assert mask[:, 0].nonzero().squeeze(-1).tolist() == [4, 8, 12, 16]
    values = observe_windows(torch.zeros(5, 20, 3, dtype=torch.float64), 4, 3, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(~torch.isnan(values[0]), mask)
    assert 0.3 < float(values[~torch.isnan(values)].std()) < 0.7
    with pytest.raises(InputError, match="no observation"):
        observation_mask(10, 3, every=4, edge=5)


def test_interpolation_is_linear_between_observations_and_constant_beyond():
    values = torch.full((2, 9, 2), math.nan, dtype=torch.float64)
    values[0, 2, 0], values[0, 6, 0] = 1.0, 3.0
    values[0, 4, 1] = -2.0
    first = interpolate_observations(values, fill=torch.tensor([5.0, 7.0], dtype=torch.float64))
    assert first[0, :, 0].tolist() == [1.0, 1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 3.0]
    assert first[0, :, 1].tolist() == [-2.0] * 9
    assert first[1, :, 0].tolist() == [5.0] * 9 and first[1, :, 1].tolist() == [7.0] * 9  # nothing observed: the fill


# --- the baselines ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_window_4dvar_recovers_noise_free_truths():
    truth = lorenz_windows(3, 40)
    values = observe_windows(truth, 8, 4, 1e-6, torch.Generator().manual_seed(1))
    values = torch.where(torch.isnan(values), values, truth)  # noise-free
    climatology = truth.reshape(-1, 3)
    estimate = WindowVar4D(iterations=12, stages=2).assimilate_windows(
        geonn.Lorenz63().double(), values, 0.01, SIGMA, first_guess=truth[:, 0] + 1.0)
    assert window_rmse(estimate[:, 8:], truth[:, 8:]) < 1e-4
    with_background = WindowVar4D(iterations=12, stages=2).assimilate_windows(
        geonn.Lorenz63().double(), values, 0.01, 1e-3, first_guess=truth[:, 0] + 1.0,
        background_mean=climatology.mean(0), background_covariance=climatology.T.cov())
    assert window_rmse(with_background[:, 8:], truth[:, 8:]) < 1e-4  # a climatological background weighs little
    with pytest.raises(InputError, match="both or neither"):
        WindowVar4D().assimilate_windows(geonn.Lorenz63().double(), values, 0.01, SIGMA, background_mean=climatology.mean(0))


def test_window_enks_equals_the_enks_of_each_window():
    truth = lorenz_windows(2, 50, seed=2)
    values = observe_windows(truth, 8, 5, SIGMA, torch.Generator().manual_seed(3))
    method = WindowEnKS(members=8, seed=4)
    ensembles = method.initial_ensembles(2, truth[:, 0].mean(0), torch.full((3,), 2.0, dtype=torch.float64))
    smoothed = method.assimilate_windows(geonn.Lorenz63().double(), values, 0.01, SIGMA, ensembles=ensembles)
    steps = (~torch.isnan(values[0, :, 0])).nonzero().squeeze(-1)
    for w in range(2):
        observations = Observations(0.01 * steps.double(), values[w, steps], ObservationError(std=SIGMA), Subset.all(3))
        reference = EnKS(members=8, lag=len(steps)).assimilate(geonn.Lorenz63().double(), observations, 0.01,
                                                               ensemble=ensembles[w])
        torch.testing.assert_close(smoothed[w, steps], reference.smoothed_mean, rtol=0, atol=1e-9)


# --- the learned solver ------------------------------------------------------------------------------------


class Oscillator(nn.Module):
    """A linear toy tendency: a damped rotation in the plane."""

    autonomous = True
    state_dim = 2

    def __init__(self):
        super().__init__()
        self.matrix = nn.Parameter(torch.tensor([[-0.1, 1.0], [-1.0, -0.1]]))

    def forward(self, t, x):
        return x @ self.matrix.T


def toy_windows(n_windows: int = 48, steps: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = 2 * torch.randn(n_windows, 2, generator=generator)
    with torch.no_grad():
        truth = geonn.rollout(Oscillator(), x0, steps - 1, 0.1).transpose(0, 1).contiguous()
    return truth, observe_windows(truth, 4, 2, 0.3, generator)


def toy_solver(step: float = 0.02) -> LearnedSolver:
    torch.manual_seed(0)
    solver = LearnedSolver(DynamicalPrior(Oscillator(), 0.1), 2, iterations=6, hidden=8, downsample=2, step=step,
                           prior_cost_weight=100.0)
    return solver


def test_the_dynamical_prior_is_one_model_step():
    truth = lorenz_windows(3, 30)
    prior = DynamicalPrior(geonn.Lorenz63().double(), 0.01)
    assert float((truth - prior(truth)).abs().max()) < 1e-10
    shifted = truth + 1.0
    torch.testing.assert_close(prior(shifted)[:, 0], shifted[:, 0])


def test_an_unfitted_solver_refuses_to_reconstruct():
    _, values = toy_windows(4)
    with pytest.raises(NotFittedError, match="fit"):
        toy_solver().reconstruct(values)
    with pytest.raises(InputError, match="kernel"):
        GradientLSTM(3, kernel=4)


def test_the_solver_iterations_lower_the_cost():
    truth, values = toy_windows()
    solver = toy_solver(step=0.01)
    solver.fitted.fill_(True)  # untrained: normalised gradient descent on U
    with torch.no_grad():
        solver.mean.copy_(truth.reshape(-1, 2).mean(0))
        solver.scale.copy_(truth.reshape(-1, 2).std(0))
    _, costs = solver.reconstruct(values, return_costs=True)
    mean_cost = costs.mean(1)
    assert bool((mean_cost[1:] < mean_cost[:-1]).all()), mean_cost
    solver = toy_solver()
    solver.fit(values, truth, config=SolverTrainConfig(epochs=4, batch_size=16, learning_rate=3e-3), progress=False)
    _, costs = solver.reconstruct(values, return_costs=True)
    assert float(costs[-1].mean()) < float(costs[0].mean())


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_error():
    truth, values = toy_windows()
    solver = toy_solver()
    result = solver.fit(values, truth, config=SolverTrainConfig(epochs=6, batch_size=16, learning_rate=1e-2),
                        progress=False, validation=(values[:8], truth[:8]))
    losses = [h["reconstruction"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert "validation_rmse" in result.history[-1]
    estimate = solver.reconstruct(values)
    first_guess = interpolate_observations(values, truth.reshape(-1, 2).mean(0))
    assert window_rmse(estimate, truth) < window_rmse(first_guess, truth)
    one = solver.assimilate(Observations(0.1 * torch.arange(4, 37, 4).double(), values[0, 4:37:4].double(),
                                         ObservationError(std=0.3)), 0.1, n_steps=39)
    torch.testing.assert_close(one.smoothed, estimate[0].double(), rtol=0, atol=1e-5)


class Interrupted(Exception):
    pass


def test_an_interrupted_training_resumes_bit_for_bit(tmp_path, monkeypatch):
    truth, values = toy_windows(32)
    config = SolverTrainConfig(epochs=3, batch_size=16, learning_rate=1e-2, seed=3)
    uninterrupted = toy_solver()
    expected = uninterrupted.fit(values, truth, config=config, checkpoint_dir=tmp_path / "a", progress=False)

    real_save = learned_module.save_checkpoint

    def save_then_stop(state, path):
        real_save(state, path)
        if state["epoch"] == 1:
            raise Interrupted

    monkeypatch.setattr(learned_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        toy_solver().fit(values, truth, config=config, checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.undo()
    resumed = toy_solver()
    result = resumed.fit(values, truth, config=config, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert result.resumed_from_epoch == 1
    assert [h["loss"] for h in result.history] == [h["loss"] for h in expected.history]
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    loaded = toy_solver().load(tmp_path / "b" / learned_module.CHECKPOINT_NAME)
    assert torch.equal(loaded.reconstruct(values), resumed.reconstruct(values))
    with pytest.raises(InputError, match="another training config"):
        toy_solver().fit(values, truth, config=SolverTrainConfig(epochs=4, batch_size=16), checkpoint_dir=tmp_path / "b",
                         resume=True, progress=False)


# --- the case ---------------------------------------------------------------------------------------------------

REDUCED = [
    "data.runs=4", "data.spinup_steps=200", "data.window=80", "data.edge=4", "data.train_windows=32",
    "data.validation_windows=8", "data.test_windows=8", "data.train_stride=20", "data.test_stride=80",
    "data.gap_steps=100", "prior.pretrain_windows=4", "prior.training.epochs=1", "prior.training.refine_epochs=1",
    "prior.training.refine_iterations=5", "solver.iterations=3", "solver.hidden=4", "training.epochs=2",
    "training.batch_size=16", "baselines.var4d_stages=2", "baselines.var4d_iterations=3",
    "baselines.var4d_plain_iterations=3", "baselines.enks_members=5", "save_windows=4",
]


def test_the_4dvarnet_case_loads():
    case = load_case("lorenz63-4dvarnet")
    assert case.kind == "learned-solver" and case.description and case.expected.source
    assert (case.data.dt, case.data.every, case.data.window, case.data.edge) == (0.01, 8, 200, 10)
    assert case.data.obs_error_std**2 == pytest.approx(2.0)
    assert (case.data.train_windows, case.data.test_windows) == (10000, 2000)
    assert check_expected(case, {"ratio_learned_to_4dvar": 0.5})[-1] == ("rmse_learned / rmse_4dvar", 0.5, 0.9, True)


@pytest.mark.slow
def test_the_4dvarnet_case_runs_reduced_and_resumes(tmp_path):
    case = load_case("lorenz63-4dvarnet", REDUCED)
    out = tmp_path / "run"
    metrics = run_case(case, out, progress=False)
    for method in ("learned", "4dvar", "4dvar_plain", "enks", "first_guess"):
        assert math.isfinite(metrics[f"rmse_{method}"]) and math.isfinite(metrics[f"rmse_{method}_interior"]), method
    assert metrics["test_windows"] == 8 and math.isfinite(metrics["ratio_learned_to_4dvar"])
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    for name in ("window.png", "rmse_by_step.png", "training.png"):
        assert (out / "figures" / name).is_file()
    import xarray as xr

    with xr.open_dataset(out / "windows.nc") as ds:
        assert ds.truth.dims == ("window", "step", "component") and ds.sizes["window"] == 4
        assert ds.rmse_by_step.attrs["long_name"] and ds.learned.attrs["units"] == "1"
        assert list(ds.estimate.values) == ["learned", "first_guess", "var4d", "var4d_plain", "enks"]
        assert float(ds.rmse_by_step.sel(estimate="learned").mean()) > 0
    assert (out / "checkpoints" / "solver.pt").is_file()
    again = run_case(case, out, resume=True, progress=False)  # a finished run resumes to the same scores
    assert again["rmse_learned"] == metrics["rmse_learned"] and again["rmse_4dvar"] == metrics["rmse_4dvar"]
