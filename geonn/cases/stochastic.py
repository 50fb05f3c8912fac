"""Stochastic cases: learn a drift and a one-step covariance by likelihood; score calibration and CRPS.

The data come from a reference model with additive noise in the dynamics, integrated by
Euler-Maruyama (:func:`geonn.dynamics.simulate_stochastic`):

    x_{t+1} = x_t + dt f(x_t) + sqrt(dt) s xi_t,    xi_t ~ N(0, I),

so a one-step transition is Gaussian with mean ``x_t + dt f(x_t)`` and covariance ``s^2 dt I``.
The learned model is the same kind of Markov chain,

    x_{t+1} = step(F_theta, x_t) + L_theta(x_t) xi_t,

a drift ``F_theta`` (an operator from :mod:`geonn.operators` inside one Runge-Kutta step, Euler
by default) and a Cholesky factor ``L_theta`` (:class:`geonn.losses.LearnedCovariance`, constant
or state-dependent), trained together on the Gaussian negative log-likelihood of the observed
transitions (:func:`geonn.losses.gaussian_nll`). A deterministic model (the same operator and
scheme, trained by :func:`geonn.training.fit` on the mean squared one-step error with the same
budget) is the baseline.

Scores, on a separate test path of the stochastic model (never seen in training):

- ``coverage90``: the fraction of test transitions inside the predicted 90% region (squared
  Mahalanobis distance under the chi-square quantile), and the whole reliability curve;
- ``noise_level_learned`` = ``sqrt(tr(L L^T) / (d dt))`` (averaged over test states), against
  the true ``s``: ``noise_level_rel_error``;
- ``crps_lead{k}``: the CRPS of an ensemble forecast (members sampled from the learned chain,
  fair estimator), and ``crps_lead{k}_deterministic``: the CRPS of the deterministic model's
  point forecast (its mean absolute error), over test starts and components.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dynamics import MODELS, simulate_stochastic
from ..errors import ConfigError
from ..fields import trajectory_to_dataset
from ..integrators import RungeKuttaStep, get_tableau, rollout
from ..io import write_figure, write_netcdf
from ..losses import LearnedCovariance, gaussian_nll
from ..metrics import crps_ensemble, gaussian_coverage
from ..operators import MLP, BilinearResidual, Standardised
from ..training import TrainConfig, fit
from .objective_fit import fit_objective


@dataclass
class StochasticData:
    """The reference drift, its noise and the simulated paths (model time units; noise in state units per sqrt(time))."""

    model: str = "lorenz63"
    model_parameters: dict = field(default_factory=dict)
    dt: float = 0.01
    noise_std: float = 1.0
    n_train: int = 10000
    n_test: int = 5000
    spinup_steps: int = 5000
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError(f"data.model: expected one of {sorted(MODELS)}, got {self.model!r}")
        if not self.dt > 0:
            raise ConfigError(f"data.dt: expected a positive step, got {self.dt}")
        if not (math.isfinite(self.noise_std) and self.noise_std > 0):
            raise ConfigError(f"data.noise_std: expected a noise level > 0, got {self.noise_std}")
        for name in ("n_train", "n_test"):
            if getattr(self, name) < 10:
                raise ConfigError(f"data.{name}: expected at least 10 steps, got {getattr(self, name)}")
        if self.spinup_steps < 0:
            raise ConfigError(f"data.spinup_steps: expected >= 0, got {self.spinup_steps}")


@dataclass
class StochasticModel:
    """The learned chain: drift operator, the scheme it runs in, and the covariance model."""

    operator: str = "bilinear"
    n_linear: int = 3
    n_bilinear: int = 3
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    scheme: str = "euler"
    covariance: str = "full"
    state_dependent: bool = False
    covariance_hidden: int = 32

    def __post_init__(self):
        if self.operator not in ("bilinear", "mlp"):
            raise ConfigError(f"model.operator: expected 'bilinear' or 'mlp', got {self.operator!r}")
        if self.covariance not in ("diagonal", "full"):
            raise ConfigError(f"model.covariance: expected 'diagonal' or 'full', got {self.covariance!r}")
        if self.covariance_hidden < 1:
            raise ConfigError(f"model.covariance_hidden: expected >= 1, got {self.covariance_hidden}")
        try:
            get_tableau(self.scheme)
        except ValueError as err:
            raise ConfigError(f"model.scheme: {err}") from None


@dataclass
class StochasticMetrics:
    """Forecast and calibration scores on the test path."""

    crps_leads: list[int] = field(default_factory=lambda: [1, 10, 50])
    curve_leads: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100])
    members: int = 50
    crps_starts: int = 500
    coverage_levels: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    forecast_steps: int = 300
    seed: int = 0

    def __post_init__(self):
        if not self.crps_leads or min(self.crps_leads) < 1 or (self.curve_leads and min(self.curve_leads) < 1):
            raise ConfigError(f"metrics.crps_leads: expected lead times >= 1 step, got {self.crps_leads}")
        if self.members < 2:
            raise ConfigError(f"metrics.members: expected at least 2 members (the fair CRPS), got {self.members}")
        if self.crps_starts < 1 or self.forecast_steps < 1:
            raise ConfigError("metrics.crps_starts, metrics.forecast_steps: expected >= 1")
        if not all(0 < q < 1 for q in self.coverage_levels) or 0.9 not in self.coverage_levels:
            raise ConfigError(f"metrics.coverage_levels: expected probabilities in (0, 1) including 0.9, got {self.coverage_levels}")


@dataclass
class StochasticExpected:
    """Targets (issue 3) and their source; checked and reported after a run."""

    source: str = ""
    coverage90_abs_error_max: float = 0.05  # |coverage90 - 0.90|: the range 0.85 to 0.95
    noise_level_rel_error_max: float = 0.10
    crps_ratio_max: float | None = 1.0  # crps_lead{k} / crps_lead{k}_deterministic, at every crps lead


@dataclass
class StochasticCase:
    """A whole stochastic case (one TOML file in ``cases/``)."""

    name: str
    kind: str = "stochastic"
    description: str = ""
    seed: int = 0
    data: StochasticData = field(default_factory=StochasticData)
    model: StochasticModel = field(default_factory=StochasticModel)
    training: TrainConfig = field(default_factory=TrainConfig)
    metrics: StochasticMetrics = field(default_factory=StochasticMetrics)
    expected: StochasticExpected = field(default_factory=StochasticExpected)

    def __post_init__(self):
        if self.training.refine != "none":
            raise ConfigError(f"training.refine: the likelihood training runs Adam only; expected 'none', got {self.training.refine!r}")
        if self.training.unroll != 1:
            raise ConfigError(f"training.unroll: the likelihood is of one-step transitions; expected 1, got {self.training.unroll}")


def simulate_paths(data: StochasticData) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The drift model, a training path ``(n_train + 1, d)`` and an independent test path ``(n_test + 1, d)``.

    The test path starts from a seeded perturbation of the default state and uses its own noise
    seed (``seed + 1``), so no noise draw is shared with the training path.
    """
    truth = MODELS[data.model](**data.model_parameters)
    train = simulate_stochastic(truth, data.n_train, data.dt, data.noise_std, spinup_steps=data.spinup_steps, seed=data.seed)
    generator = torch.Generator().manual_seed(data.seed + 1)
    x0 = truth.default_initial_state() + torch.randn(truth.state_dim, generator=generator, dtype=torch.float64)
    test = simulate_stochastic(truth, data.n_test, data.dt, data.noise_std, x0=x0, spinup_steps=data.spinup_steps,
                               seed=data.seed + 1)
    return truth, torch.as_tensor(train.state.values), torch.as_tensor(test.state.values)


def _drift(config: StochasticModel, train: torch.Tensor, dt: float) -> Standardised:
    d = train.shape[-1]
    if config.operator == "bilinear":
        operator = BilinearResidual(d, config.n_linear, config.n_bilinear)
    else:
        operator = MLP(d, tuple(config.hidden), config.activation)
    increments = (train[1:] - train[:-1]) / dt
    return Standardised(operator.double(), train.mean(0), train.std(0), increments.std(0))


class StochasticChain(torch.nn.Module):
    """The learned Markov chain ``x_{t+1} = step(F, x_t) + L(x_t) xi``, ``xi ~ N(0, I)``.

    Args:
        drift: the tendency ``F(t, x)``; step: the scheme it runs in; covariance: the Cholesky
        factor model (constant or state-dependent); dt: the step (model time units).
    """

    def __init__(self, drift: torch.nn.Module, step: RungeKuttaStep, covariance: LearnedCovariance, dt: float):
        super().__init__()
        self.drift, self.step, self.covariance, self.dt = drift, step, covariance, float(dt)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The one-step mean ``(..., d)``."""
        return self.step(self.drift, torch.zeros((), dtype=x.dtype), x, self.dt)

    def scale_tril(self, x: torch.Tensor) -> torch.Tensor:
        """The one-step Cholesky factor, ``(..., d, d)`` (broadcast over ``x``'s leading dimensions)."""
        factor = self.covariance(x) if self.covariance.state_dependent else self.covariance()
        return factor.expand(*x.shape, x.shape[-1])

    def sample(self, x0: torch.Tensor, n_steps: int, generator: torch.Generator) -> torch.Tensor:
        """A sampled path ``(n_steps + 1, *x0.shape)`` of the chain (no gradient)."""
        states = [x0]
        x = x0
        with torch.no_grad():
            for _ in range(n_steps):
                xi = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x = self.mean(x) + (self.scale_tril(x) @ xi.unsqueeze(-1)).squeeze(-1)
                states.append(x)
        return torch.stack(states)


def _noise_level(chain: StochasticChain, states: torch.Tensor) -> float:
    """``sqrt(mean tr(L L^T) / (d dt))`` over ``states``: the learned noise level in the units of ``s``."""
    with torch.no_grad():
        factor = chain.scale_tril(states)
        return math.sqrt(float(factor.pow(2).sum((-2, -1)).mean()) / (states.shape[-1] * chain.dt))


def run_stochastic(case: StochasticCase, out: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Run the case and write ``forecast.nc`` and figures into ``out``; return the metrics."""
    started = time.perf_counter()
    data, metrics_config = case.data, case.metrics
    leads = sorted(set(metrics_config.crps_leads) | set(metrics_config.curve_leads))
    horizon = max(leads)
    if data.n_test <= horizon:
        raise ConfigError(f"data.n_test: expected more than the longest lead ({horizon} steps), got {data.n_test}")
    truth, train, test = simulate_paths(data)
    d = truth.state_dim

    # The stochastic model: drift + covariance, trained together on the Gaussian NLL of transitions.
    torch.manual_seed(case.seed)
    increments = train[1:] - train[:-1]
    covariance = LearnedCovariance(d, kind=case.model.covariance, state_dependent=case.model.state_dependent,
                                   hidden=case.model.covariance_hidden, initial_std=float(increments.std())).double()
    chain = StochasticChain(_drift(case.model, train, data.dt), RungeKuttaStep(case.model.scheme), covariance, data.dt)
    starts, targets = train[:-1], train[1:]

    def likelihood(idx, step_number):
        x = starts[idx]
        return gaussian_nll(chain.mean(x), targets[idx], scale_tril=chain.scale_tril(x), constant=False)

    checkpoints = out / "checkpoints"
    result = fit_objective({"chain": chain}, likelihood, starts.shape[0], case.training,
                           checkpoint_path=checkpoints / "likelihood.pt", resume=resume, progress=progress, desc="likelihood")

    # The deterministic baseline: the same operator and scheme, mean squared one-step error, same budget.
    torch.manual_seed(case.seed)
    deterministic = _drift(case.model, train, data.dt)
    det_step = RungeKuttaStep(case.model.scheme)
    det_result = fit(deterministic, train, data.dt, step=det_step, config=case.training,
                     checkpoint_dir=checkpoints / "deterministic", resume=resume, progress=progress)
    chain.eval(), deterministic.eval()

    # Calibration of the one-step predictive distribution on the test path.
    with torch.no_grad():
        x_test, y_test = test[:-1], test[1:]
        residual = y_test - chain.mean(x_test)
        factor = chain.scale_tril(x_test)
        coverage = gaussian_coverage(residual, factor, metrics_config.coverage_levels)
        nll_test = float(gaussian_nll(residual, scale_tril=factor))
    noise_learned = _noise_level(chain, x_test)

    # Ensemble (sampled chain) vs deterministic forecasts from evenly spaced test starts.
    n_starts = min(metrics_config.crps_starts, data.n_test - horizon)
    start_index = torch.linspace(0, data.n_test - horizon, n_starts).round().long()
    generator = torch.Generator().manual_seed(metrics_config.seed)
    x0 = test[start_index].expand(metrics_config.members, n_starts, d)
    ensemble = chain.sample(x0, horizon, generator)  # (horizon + 1, members, starts, d)
    with torch.no_grad():
        point = rollout(deterministic, test[start_index], horizon, data.dt, det_step, nonfinite="keep")
    crps, crps_det = {}, {}
    for k in leads:
        observed = test[start_index + k]
        crps[k] = float(crps_ensemble(ensemble[k], observed).mean())
        crps_det[k] = float((point[k] - observed).abs().mean())

    # One free ensemble forecast from the first test state, for the file and the figure.
    n_forecast = min(metrics_config.forecast_steps, data.n_test)
    plume = chain.sample(test[0].expand(metrics_config.members, d), n_forecast, generator)
    with torch.no_grad():
        point_forecast = rollout(deterministic, test[0], n_forecast, data.dt, det_step, nonfinite="keep")

    _write_outputs(case, out, truth, test, plume, point_forecast, leads, crps, crps_det, coverage, factor)

    metrics = {"coverage90": coverage[0.9]}
    metrics.update({f"coverage{round(100 * q):02d}": v for q, v in coverage.items() if q != 0.9})
    metrics.update(
        noise_level_learned=noise_learned,
        noise_level_true=data.noise_std,
        noise_level_rel_error=abs(noise_learned - data.noise_std) / data.noise_std,
        nll_test=nll_test,
    )
    for k in metrics_config.crps_leads:
        metrics[f"crps_lead{k}"] = crps[k]
        metrics[f"crps_lead{k}_deterministic"] = crps_det[k]
    metrics.update(
        train_seconds=result.train_seconds,
        train_seconds_deterministic=det_result.train_seconds,
        final_loss=result.final_loss,
        final_loss_deterministic=det_result.final_loss,
        n_params=sum(p.numel() for p in chain.parameters() if p.requires_grad),
        case_seconds=time.perf_counter() - started,
    )
    return metrics


def _write_outputs(case, out, truth, test, plume, point_forecast, leads, crps, crps_det, coverage, factor) -> None:
    data = case.data
    n_forecast = plume.shape[0] - 1
    times = data.dt * torch.arange(n_forecast + 1, dtype=torch.float64)
    units = "1"
    ds = trajectory_to_dataset(
        {"truth": test[: n_forecast + 1], "ensemble": plume, "deterministic": point_forecast},
        times,
        truth.component_names(),
        variable_attrs={
            "truth": {"long_name": f"stochastic {truth.name} state (test path)", "units": units},
            "ensemble": {"long_name": "ensemble forecast sampled from the learned stochastic model", "units": units},
            "deterministic": {"long_name": "forecast of the deterministic (mean squared error) model", "units": units},
        },
        attrs={
            "title": f"geonn case {case.name}: learned stochastic model vs truth",
            "Conventions": "CF-1.8",
            "source": "geonn",
            "case": case.name,
            "dt": data.dt,
            "noise_std": data.noise_std,
            "scheme": case.model.scheme,
            "operator": case.model.operator,
            "covariance": case.model.covariance + (" state-dependent" if case.model.state_dependent else " constant"),
        },
    )
    ds["crps"] = ("lead", [crps[k] for k in leads],
                  {"long_name": "CRPS of the ensemble forecast (fair), mean over test starts and components", "units": units})
    ds["crps_deterministic"] = ("lead", [crps_det[k] for k in leads],
                                {"long_name": "CRPS (mean absolute error) of the deterministic forecast", "units": units})
    levels = sorted(coverage)
    ds["coverage"] = ("nominal_level", [coverage[q] for q in levels],
                      {"long_name": "fraction of test transitions inside the predicted central region", "units": "1"})
    mean_covariance = (factor @ factor.transpose(-1, -2)).reshape(-1, factor.shape[-1], factor.shape[-1]).mean(0)
    ds["one_step_covariance"] = (("component", "component_2"), mean_covariance.numpy(),
                                 {"long_name": "learned one-step covariance L L^T (mean over test states)", "units": "1"})
    ds = ds.assign_coords(
        lead=("lead", leads, {"long_name": "forecast lead", "units": "steps"}),
        lead_time=("lead", [k * data.dt for k in leads], {"long_name": "forecast lead time", "units": "model time units"}),
        nominal_level=("nominal_level", levels, {"long_name": "nominal probability of the predicted region", "units": "1"}),
        component_2=("component_2", list(truth.component_names()), {"long_name": "state component"}),
    )
    write_netcdf(ds, out / "forecast.nc")

    figures = out / "figures"
    _reliability_figure(levels, [coverage[q] for q in levels], figures / "reliability.png")
    _crps_figure(leads, [crps[k] for k in leads], [crps_det[k] for k in leads], data.dt, figures / "crps_by_lead.png")
    _plume_figure(times.numpy(), test[: n_forecast + 1].numpy(), plume.numpy(), point_forecast.numpy(),
                  figures / "ensemble_forecast.png", truth.component_names())


def _reliability_figure(levels, observed, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="perfect calibration")
    ax.plot(levels, observed, "o-", color="tab:red", label="learned model (test transitions)")
    ax.set_xlabel("nominal probability of the predicted region")
    ax.set_ylabel("observed fraction inside")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title("Reliability of the one-step predictive distribution")
    ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)
    return write_figure(fig, path)


def _crps_figure(leads, crps, crps_det, dt, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    lead_times = [k * dt for k in leads]
    ax.loglog(lead_times, crps, "o-", color="tab:red", label="ensemble (learned stochastic model)")
    ax.loglog(lead_times, crps_det, "s--", color="k", label="deterministic model (MAE)")
    ax.set_xlabel("lead time (model time units)")
    ax.set_ylabel("CRPS (state units)")
    ax.set_title("CRPS on the test path")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return write_figure(fig, path)


def _plume_figure(times, truth, plume, point, path, labels):
    import matplotlib.pyplot as plt

    n = min(3, truth.shape[-1])
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 * n), sharex=True)
    for i, ax in enumerate(axes):
        ax.plot(times, plume[:, :, i], color="tab:red", lw=0.4, alpha=0.25)
        ax.plot(times, truth[:, i], color="k", lw=1.2, label="truth (test path)")
        ax.plot(times, point[:, i], color="tab:blue", lw=1, ls="--", label="deterministic model")
        ax.set_ylabel(labels[i])
    axes[0].plot([], [], color="tab:red", lw=1, label="ensemble members")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("time (model time units)")
    return write_figure(fig, path)


def check_expected(case: StochasticCase, metrics: dict) -> list[tuple[str, float, float, bool]]:
    """Rows of (name, value, bound, met) for the case's targets."""
    expected = case.expected
    rows = []
    if "coverage90" in metrics:
        error = abs(metrics["coverage90"] - 0.9)
        rows.append(("|coverage90 - 0.90|", error, expected.coverage90_abs_error_max, error <= expected.coverage90_abs_error_max))
    if "noise_level_rel_error" in metrics:
        value = metrics["noise_level_rel_error"]
        rows.append(("noise_level_rel_error", value, expected.noise_level_rel_error_max, value <= expected.noise_level_rel_error_max))
    if expected.crps_ratio_max is not None:
        for k in case.metrics.crps_leads:
            ens, det = metrics.get(f"crps_lead{k}"), metrics.get(f"crps_lead{k}_deterministic")
            if ens is not None and det:
                ratio = ens / det
                rows.append((f"crps_lead{k} / crps_lead{k}_deterministic", ratio, expected.crps_ratio_max,
                             ratio <= expected.crps_ratio_max))
    return rows


CONFIG = StochasticCase
run = run_stochastic
