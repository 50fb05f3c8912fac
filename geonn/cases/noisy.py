"""Noisy cases: learn a tendency jointly with the clean states from noisy observations of every component.

The reference model is simulated as in the identification cases (fablet2018 setup); every state
of the training trajectory is observed with independent Gaussian noise of std ``obs_noise_std``.
The learned operator (in a Runge-Kutta step) and the unknown clean states are estimated together
by minimising the weak-constraint cost of :mod:`geonn.joint` (observation misfit plus dynamical
misfit, a decreasing schedule of model-error std), starting from a Gaussian-smoothed copy of the
observations and an operator pre-trained on it (nguyen2020, fablet2021). Two baselines see the same
noisy data: the same operator trained with the ordinary one-step loss on the noisy pairs, and
pysindy's SINDy with its smoothed finite-difference derivatives (brunton2016; needs the ``bench``
extra, and is reported as absent with a warning without it). All three are scored on a separate
clean test trajectory (forecast RMSE by lead, largest Lyapunov exponent); the Laplace spread of
the joint estimate (:func:`geonn.joint.parameter_covariance`) says how well the data determine it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from ..errors import ConfigError, InputError
from ..fields import trajectory_to_dataset
from ..integrators import RungeKuttaStep, rollout
from ..io import write_figure, write_netcdf
from ..joint import JointConfig, estimate_jointly, forecast_spread, parameter_covariance
from ..metrics import forecast_rmse, lyapunov_max
from ..operators import Standardised
from ..training import TrainConfig, fit
from .identification import DataConfig, MetricsConfig, ModelConfig, build_operator, simulate_data


@dataclass
class NoisyData(DataConfig):
    """The identification data, every component observed with Gaussian noise of std ``obs_noise_std`` (state units)."""

    obs_noise_std: float = 1.0
    noise_seed: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.obs_noise_std) and self.obs_noise_std > 0):
            raise ConfigError(f"data.obs_noise_std: expected a noise std > 0, got {self.obs_noise_std}")


@dataclass
class Initial:
    """The initial states: the observations smoothed by a Gaussian filter of std ``smoothing_steps`` (steps; 0: none)."""

    smoothing_steps: float = 3.0

    def __post_init__(self):
        if not (math.isfinite(self.smoothing_steps) and self.smoothing_steps >= 0):
            raise ConfigError(f"initial.smoothing_steps: expected a width >= 0 (steps), got {self.smoothing_steps}")


def _regression_default() -> TrainConfig:
    return TrainConfig(epochs=20, refine="lm", refine_epochs=2, refine_iterations=30)


@dataclass
class Baselines:
    """The two baselines: one-step regression on the noisy pairs, and SINDy (pysindy) with smoothed derivatives."""

    regression: bool = True
    regression_training: TrainConfig = field(default_factory=_regression_default)
    sindy: bool = True
    sindy_threshold: float = 0.1       # STLSQ threshold
    sindy_window: int = 11             # Savitzky-Golay window of SmoothedFiniteDifference (pysindy's default)
    sindy_polyorder: int = 3           # its polynomial order (pysindy's default)

    def __post_init__(self):
        if self.sindy_window < 3 or self.sindy_window % 2 == 0:
            raise ConfigError(f"baselines.sindy_window: expected an odd window of at least 3 steps, got {self.sindy_window}")
        if not 0 < self.sindy_polyorder < self.sindy_window:
            raise ConfigError(f"baselines.sindy_polyorder: expected 0 < order < sindy_window, got {self.sindy_polyorder}")
        if not self.sindy_threshold >= 0:
            raise ConfigError(f"baselines.sindy_threshold: expected >= 0, got {self.sindy_threshold}")


@dataclass
class NoisyMetrics(MetricsConfig):
    """As the identification metrics, plus the Laplace spread of the joint estimate's lead-1 forecasts."""

    posterior_spread: bool = True
    posterior_starts: int = 500


@dataclass
class NoisyExpected:
    """Targets: ``max`` bounds on metrics, on ``rmse_lead1`` over the better baseline's, and on the exponent's
    distance to a reference value."""

    source: str = ""
    max: dict = field(default_factory=dict)
    baseline_ratio_max: float | None = None
    lyapunov_reference: float = 0.9
    lyapunov_abs_error_max: float | None = None


def _pretraining_default() -> TrainConfig:
    return TrainConfig(epochs=10, refine="lm", refine_epochs=2, refine_iterations=30)


@dataclass
class NoisyCase:
    """A whole noisy-identification case (one TOML file in ``cases/``)."""

    name: str
    kind: str = "noisy"
    description: str = ""
    seed: int = 0
    data: NoisyData = field(default_factory=NoisyData)
    model: ModelConfig = field(default_factory=ModelConfig)
    initial: Initial = field(default_factory=Initial)
    pretraining: TrainConfig = field(default_factory=_pretraining_default)
    joint: JointConfig = field(default_factory=JointConfig)
    baselines: Baselines = field(default_factory=Baselines)
    metrics: NoisyMetrics = field(default_factory=NoisyMetrics)
    expected: NoisyExpected = field(default_factory=NoisyExpected)


class PolynomialTendency(torch.nn.Module):
    """A fitted pysindy polynomial model as a torch tendency ``f(t, x) = Theta(x) @ Xi^T``.

    ``powers`` ``(n_features, state_dim)`` are the library's exponents, ``coefficients``
    ``(state_dim, n_features)`` the fitted ``Xi`` (state units per model time unit).
    """

    autonomous = True

    def __init__(self, powers, coefficients):
        super().__init__()
        self.register_buffer("powers", torch.as_tensor(np.asarray(powers), dtype=torch.float64))
        self.register_buffer("xi", torch.as_tensor(np.asarray(coefficients), dtype=torch.float64))

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        theta = x.unsqueeze(-2).pow(self.powers).prod(-1)  # (..., n_features); x**0 == 1 gives the bias
        return theta @ self.xi.T


def fit_sindy(observations: torch.Tensor, dt: float, baselines: Baselines, names: list[str]):
    """SINDy (degree-2 polynomial library, STLSQ) with SmoothedFiniteDifference derivatives, as a
    torch tendency; ``None`` with a warning when pysindy is not installed."""
    try:
        import pysindy as ps
    except ImportError:
        warnings.warn("pysindy is not installed (pip install 'geonn[bench]'): the SINDy baseline is reported as absent",
                      stacklevel=2)
        return None
    differentiation = ps.SmoothedFiniteDifference(
        smoother_kws={"window_length": baselines.sindy_window, "polyorder": baselines.sindy_polyorder})
    model = ps.SINDy(optimizer=ps.STLSQ(threshold=baselines.sindy_threshold), feature_library=ps.PolynomialLibrary(degree=2),
                     differentiation_method=differentiation)
    x = observations.numpy()
    model.fit(x, t=dt, feature_names=list(names))
    tendency = PolynomialTendency(model.feature_library.powers_, model.coefficients())
    with torch.no_grad():
        ours = tendency(None, observations[:200]).numpy()
    theirs = model.predict(x[:200])
    if np.abs(ours - theirs).max() > 1e-9 * max(1.0, float(np.abs(theirs).max())):
        raise RuntimeError("the SINDy torch tendency disagrees with pysindy's predict")
    return tendency


def _lyapunov(f, test, dt, step, metrics: MetricsConfig, seed: int) -> float:
    """The largest Lyapunov exponent from evenly spaced test states (NaN if the model diverges)."""
    n_lyap = metrics.lyapunov_trajectories
    starts = test[:: max(1, test.shape[0] // n_lyap)][:n_lyap]
    try:
        return lyapunov_max(f, starts, dt, step, n_steps=metrics.lyapunov_steps, spinup_steps=min(1000, metrics.lyapunov_steps),
                            seed=seed)[0]
    except InputError:  # the model's trajectories diverged
        return math.nan


def _score(f, test, dt, step, metrics: MetricsConfig, seed: int) -> tuple[dict[int, float], float]:
    """Forecast RMSE at every lead of the case and the largest Lyapunov exponent."""
    # a baseline that diverges is scored inf at the leads where it does (it is a result, not an error)
    rmse = forecast_rmse(f, test, dt, sorted(set(metrics.leads) | set(metrics.curve_leads)), step, nonfinite="keep")
    return rmse, _lyapunov(f, test, dt, step, metrics, seed)


def run_noisy(case: NoisyCase, out: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Run the case into ``out`` (``states.nc``, ``forecast.nc``, figures); return the metrics."""
    from .. import plotting

    started = time.perf_counter()
    data = case.data
    truth_model, train, test = simulate_data(data)
    names = truth_model.component_names()
    generator = torch.Generator().manual_seed(data.noise_seed)
    observations = train + data.obs_noise_std * torch.randn(train.shape, generator=generator, dtype=train.dtype)
    initial = observations.clone()
    if case.initial.smoothing_steps > 0:
        initial = torch.as_tensor(gaussian_filter1d(observations.numpy(), case.initial.smoothing_steps, axis=0, mode="nearest"))
    checkpoints = out / "checkpoints"

    # joint estimate: operator pre-trained on the smoothed states, then states and operator together
    torch.manual_seed(case.seed)
    operator = build_operator(case.model, truth_model.state_dim).double()
    model = Standardised(operator, initial.mean(0), initial.std(0), ((initial[1:] - initial[:-1]) / data.dt).std(0))
    step = RungeKuttaStep(case.model.scheme, learnable=case.model.learnable_scheme, learn_dt=case.model.learn_dt)
    pre = fit(model, initial, data.dt, step=step, config=case.pretraining, checkpoint_dir=checkpoints / "pretraining",
              resume=resume, progress=progress)
    joint = estimate_jointly(model, observations, data.dt, states=initial, obs_std=data.obs_noise_std, step=step,
                             config=case.joint, checkpoint_dir=checkpoints / "joint", resume=resume, progress=progress)
    model.eval()
    rmse, lyap = _score(model, test, data.dt, step, case.metrics, case.seed)
    lyap_true = _lyapunov(truth_model, test, data.dt, step.tableau.name, case.metrics, case.seed)

    # baselines on the same noisy data
    results = {"joint": (rmse, lyap)}
    if case.baselines.regression:
        torch.manual_seed(case.seed)
        regression = Standardised(build_operator(case.model, truth_model.state_dim).double(), observations.mean(0),
                                  observations.std(0), ((observations[1:] - observations[:-1]) / data.dt).std(0))
        regression_step = RungeKuttaStep(case.model.scheme, learnable=case.model.learnable_scheme, learn_dt=case.model.learn_dt)
        fit(regression, observations, data.dt, step=regression_step, config=case.baselines.regression_training,
            checkpoint_dir=checkpoints / "regression", resume=resume, progress=progress)
        regression.eval()
        results["regression"] = _score(regression, test, data.dt, regression_step, case.metrics, case.seed)
    sindy = fit_sindy(observations, data.dt, case.baselines, names) if case.baselines.sindy else None
    if sindy is not None:
        results["sindy"] = _score(sindy, test, data.dt, step.tableau.name, case.metrics, case.seed)

    spread = math.nan
    if case.metrics.posterior_spread:
        covariance = parameter_covariance(model, joint.states, observations, data.dt, obs_std=data.obs_noise_std,
                                          model_std=case.joint.model_std[-1], horizons=case.joint.horizons, step=step)
        starts = test[:: max(1, test.shape[0] // case.metrics.posterior_starts)]
        spread = forecast_spread(model, covariance, starts, data.dt, lead=1, step=step)

    # outputs
    units = {"units": "1"}
    times = data.dt * torch.arange(train.shape[0], dtype=torch.float64)
    states_ds = trajectory_to_dataset(
        {"truth": train, "observations": observations, "initial": initial, "estimate": joint.states},
        times, names,
        variable_attrs={
            "truth": {**units, "long_name": f"true {truth_model.name} state (training trajectory, never seen)"},
            "observations": {**units, "long_name": f"observed state: truth plus Gaussian noise of std {data.obs_noise_std}"},
            "initial": {**units, "long_name": f"observations smoothed by a Gaussian filter of std {case.initial.smoothing_steps} steps"},
            "estimate": {**units, "long_name": "state estimated jointly with the learned model (weak-constraint cost)"},
        },
        attrs={"title": f"geonn case {case.name}: clean states estimated from noisy observations", "Conventions": "CF-1.8",
               "source": "geonn", "case": case.name, "dt": data.dt, "obs_noise_std": data.obs_noise_std},
    )
    write_netcdf(states_ds, out / "states.nc")
    with torch.no_grad():
        n_forecast = min(case.metrics.forecast_steps, data.n_test)
        forecast = rollout(model, test[0], n_forecast, data.dt, step, nonfinite="keep")
        attractor = rollout(model, test[0], data.n_test, data.dt, step, nonfinite="keep")
    forecast_times = data.dt * torch.arange(n_forecast + 1, dtype=torch.float64)
    forecast_ds = trajectory_to_dataset(
        {"truth": test[: n_forecast + 1], "forecast": forecast}, forecast_times, names,
        variable_attrs={"truth": {**units, "long_name": f"true {truth_model.name} state (test trajectory)"},
                        "forecast": {**units, "long_name": "free forecast of the jointly learned model from the first test state"}},
        attrs={"title": f"geonn case {case.name}: forecasts of the learned models vs truth", "Conventions": "CF-1.8",
               "source": "geonn", "case": case.name, "dt": data.dt, "scheme": step.tableau.name},
    )
    leads = sorted(rmse)
    for method, (method_rmse, _) in results.items():
        forecast_ds[f"rmse_{method}"] = ("lead", [method_rmse[k] for k in leads],
                                         {"long_name": f"forecast RMSE of the {method} model over clean test starts and components",
                                          "units": "1"})
    forecast_ds = forecast_ds.assign_coords(
        lead=("lead", leads, {"long_name": "forecast lead", "units": "steps"}),
        lead_time=("lead", [k * data.dt for k in leads], {"long_name": "forecast lead time", "units": "model time units"}))
    write_netcdf(forecast_ds, out / "forecast.nc")

    figures = out / "figures"
    _states_figure(times.numpy(), train.numpy(), observations.numpy(), joint.states.numpy(), names, figures / "states.png")
    _rmse_figure(leads, {m: [r[k] for k in leads] for m, (r, _) in results.items()}, data.dt, figures / "rmse_by_lead.png")
    plotting.attractor(test.numpy(), attractor.numpy(), figures / "attractor.png", labels=names)

    metrics = {f"rmse_lead{k}": rmse[k] for k in case.metrics.leads}
    metrics.update(lyapunov_max=lyap, lyapunov_max_true=lyap_true)
    for method in ("regression", "sindy"):
        method_rmse, method_lyap = results.get(method, ({k: math.nan for k in leads}, math.nan))
        metrics.update({f"{method}_rmse_lead{k}": method_rmse[k] for k in case.metrics.leads})
        metrics[f"{method}_lyapunov_max"] = method_lyap
    baseline_lead1 = [r[0][min(case.metrics.leads)] for m, r in results.items() if m != "joint"]
    baseline_lead1 = [v for v in baseline_lead1 if math.isfinite(v)]
    metrics["ratio_to_best_baseline"] = rmse[min(case.metrics.leads)] / min(baseline_lead1) if baseline_lead1 else math.nan
    edge = max(1, train.shape[0] // 100)  # the first and last 1% of the states are only constrained from one side
    metrics.update(
        sindy_available=sindy is not None,
        posterior_spread_lead1=spread,
        state_rmse=float((joint.states - train)[edge:-edge].pow(2).mean().sqrt()),
        initial_state_rmse=float((initial - train)[edge:-edge].pow(2).mean().sqrt()),
        observation_rmse=float((observations - train).pow(2).mean().sqrt()),
        train_seconds=pre.train_seconds + joint.seconds,
        joint_seconds=joint.seconds,
        n_params=sum(p.numel() for p in [*model.parameters(), *step.parameters()] if p.requires_grad),
        case_seconds=time.perf_counter() - started,
    )
    return metrics


def _states_figure(times, truth, observations, estimate, names, path: Path, n_steps: int = 500) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.2 * len(names)), sharex=True)
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.plot(times[:n_steps], observations[:n_steps, i], ".", ms=2, color="0.6", label="observations")
        ax.plot(times[:n_steps], truth[:n_steps, i], color="k", lw=1.2, label="truth (not seen)")
        ax.plot(times[:n_steps], estimate[:n_steps, i], color="tab:red", lw=1, ls="--", label="joint estimate")
        ax.set_ylabel(names[i])
    np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("time (model time units)")
    fig.suptitle("States estimated jointly with the learned model from noisy observations")
    return write_figure(fig, path)


def _rmse_figure(leads, curves: dict, dt: float, path: Path) -> Path:
    import matplotlib.pyplot as plt

    labels = {"joint": "joint (weak constraint)", "regression": "one-step regression on noisy pairs",
              "sindy": "SINDy, smoothed derivatives"}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, values in curves.items():
        ax.loglog(np.asarray(leads) * dt, values, "o-", label=labels.get(method, method))
    ax.set_xlabel("lead time (model time units)")
    ax.set_ylabel("RMSE vs clean truth")
    ax.set_title("Forecast RMSE on the clean test trajectory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return write_figure(fig, path)


def check_expected(case: NoisyCase, metrics: dict) -> list[tuple[str, float, float, bool]]:
    """Compare metrics with the case's recorded targets: rows of (name, value, bound, met)."""
    rows = []
    for name, bound in case.expected.max.items():
        value = metrics.get(name)
        if value is not None:
            rows.append((name, float(value), float(bound), float(value) <= float(bound)))
    if case.expected.baseline_ratio_max is not None:
        value = metrics.get("ratio_to_best_baseline")
        value = math.nan if value is None else float(value)
        rows.append(("rmse_lead1 / better baseline's", value, case.expected.baseline_ratio_max,
                     value <= case.expected.baseline_ratio_max))
    if case.expected.lyapunov_abs_error_max is not None:
        value = metrics.get("lyapunov_max")
        error = math.nan if value is None else abs(float(value) - case.expected.lyapunov_reference)
        rows.append((f"|lyapunov_max - {case.expected.lyapunov_reference}|", error, case.expected.lyapunov_abs_error_max,
                     error <= case.expected.lyapunov_abs_error_max))
    return rows


CONFIG = NoisyCase
run = run_noisy
