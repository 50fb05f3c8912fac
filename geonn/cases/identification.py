"""Identification cases: learn a tendency from a simulated trajectory and score its forecasts.

The setup follows fablet2018: noise-free states of a reference model sampled every ``dt``, a
learned operator inside a Runge-Kutta step trained on consecutive pairs (or ``unroll``-step
windows), and scores on a separate test trajectory: forecast RMSE by lead and the largest
Lyapunov exponent of the learned model beside the true one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dynamics import MODELS, simulate
from ..errors import ConfigError
from ..fields import trajectory_to_dataset
from ..integrators import RungeKuttaStep, get_tableau, rollout
from ..io import write_netcdf
from ..metrics import forecast_rmse, lyapunov_max
from ..operators import MLP, BilinearResidual, PeriodicConv1d, Standardised
from ..operators.networks import ACTIVATIONS
from ..training import TrainConfig, fit


@dataclass
class DataConfig:
    """The reference model and the simulated data (model time units)."""

    model: str = "lorenz63"
    model_parameters: dict = field(default_factory=dict)
    dt: float = 0.01
    n_train: int = 10000
    n_test: int = 5000
    spinup_steps: int = 5000
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError(f"data.model: expected one of {sorted(MODELS)}, got {self.model!r}")
        if not math.isfinite(self.dt) or self.dt <= 0:
            raise ConfigError(f"data.dt: expected a positive step (a finite number), got {self.dt}")
        for name in ("n_train", "n_test"):
            if not 10 <= getattr(self, name) < 2**31:
                raise ConfigError(f"data.{name}: expected at least 10 steps (and fewer than 2**31), got {getattr(self, name)}")
        if not 0 <= self.spinup_steps < 2**31:
            raise ConfigError(f"data.spinup_steps: expected >= 0 (and fewer than 2**31), got {self.spinup_steps}")
        if not 0 <= self.seed < 2**63 - 1:
            raise ConfigError(f"data.seed: expected an integer in [0, 2**63 - 1), got {self.seed}")
        try:
            MODELS[self.model](**self.model_parameters)
        except (TypeError, ValueError) as err:  # an unknown parameter name, or a value that is not a finite number
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"data.model_parameters: not parameters of {self.model} ({first}), got {self.model_parameters!r}") from None


@dataclass
class ModelConfig:
    """The learned operator and the scheme it runs in."""

    operator: str = "bilinear"
    n_linear: int = 3
    n_bilinear: int = 3
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    radius: int = 2
    scheme: str = "rk4"
    learnable_scheme: bool = False
    learn_dt: bool = False

    def __post_init__(self):
        if self.operator not in ("bilinear", "mlp", "conv1d"):
            raise ConfigError(f"model.operator: expected 'bilinear', 'mlp' or 'conv1d', got {self.operator!r}")
        try:
            get_tableau(self.scheme)
        except ValueError as err:
            raise ConfigError(f"model.scheme: {err}") from None
        for name in ("n_linear", "n_bilinear", "radius"):
            if not 1 <= getattr(self, name) <= 2**20:
                raise ConfigError(f"model.{name}: expected an integer in [1, 2**20], got {getattr(self, name)}")
        if not all(1 <= width <= 2**20 for width in self.hidden):
            raise ConfigError(f"model.hidden: expected layer widths in [1, 2**20], got {self.hidden}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation: expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}")


@dataclass
class MetricsConfig:
    """What is scored on the test trajectory."""

    leads: list[int] = field(default_factory=lambda: [1, 4, 8])
    curve_leads: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    lyapunov_steps: int = 10000
    lyapunov_trajectories: int = 8
    forecast_steps: int = 1000

    def __post_init__(self):
        for name in ("leads", "curve_leads"):
            values = getattr(self, name)
            if not values or min(values) < 1 or max(values) >= 2**31:
                raise ConfigError(f"metrics.{name}: expected lead times >= 1 step, got {values}")
        for name in ("lyapunov_steps", "lyapunov_trajectories", "forecast_steps"):
            if not 1 <= getattr(self, name) < 2**31:
                raise ConfigError(f"metrics.{name}: expected an integer >= 1, got {getattr(self, name)}")


@dataclass
class Expected:
    """Targets recorded in the case file, with their source; checked and reported after a run."""

    source: str = ""
    max: dict = field(default_factory=dict)
    lyapunov_abs_error_max: float | None = None


@dataclass
class IdentificationCase:
    """A whole identification case (one TOML file in ``cases/``)."""

    name: str
    kind: str = "identification"
    description: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    expected: Expected = field(default_factory=Expected)


def build_operator(config: ModelConfig, state_dim: int) -> torch.nn.Module:
    if config.operator == "bilinear":
        return BilinearResidual(state_dim, config.n_linear, config.n_bilinear)
    if config.operator == "mlp":
        return MLP(state_dim, tuple(config.hidden), config.activation)
    return PeriodicConv1d(config.n_linear, config.n_bilinear, config.radius)


def simulate_data(data: DataConfig) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The case's true model, training trajectory ``(n_train + 1, D)`` and a separate test
    trajectory ``(n_test + 1, D)`` started from a seeded perturbation of the default state."""
    truth_model = MODELS[data.model](**data.model_parameters)
    train_ds = simulate(truth_model, data.n_train, data.dt, spinup_steps=data.spinup_steps, seed=data.seed)
    generator = torch.Generator().manual_seed(data.seed + 1)
    test_x0 = truth_model.default_initial_state() + torch.randn(truth_model.state_dim, generator=generator, dtype=torch.float64)
    test_ds = simulate(truth_model, data.n_test, data.dt, x0=test_x0, spinup_steps=data.spinup_steps, seed=data.seed)
    return truth_model, torch.as_tensor(train_ds.state.values), torch.as_tensor(test_ds.state.values)


def run_identification(case: IdentificationCase, out: Path, *, resume: bool = False, progress: bool = True,
                       device: torch.device | str = "cpu") -> dict:
    """Run the case and write ``forecast.nc`` and figures into ``out``; return the metrics.

    ``device`` is where the training runs (``geonn case ... --device``); the data are simulated and
    the model is scored on the CPU, so the metrics and outputs do not depend on it beyond round-off.
    """
    from .. import plotting

    started = time.perf_counter()
    data = case.data
    truth_model, train, test = simulate_data(data)

    torch.manual_seed(case.seed)
    operator = build_operator(case.model, truth_model.state_dim).double()
    increments = (train[1:] - train[:-1]) / data.dt
    model = Standardised(operator, train.mean(0), train.std(0), increments.std(0))
    step = RungeKuttaStep(case.model.scheme, learnable=case.model.learnable_scheme, learn_dt=case.model.learn_dt)
    device = torch.device(device)
    model.to(device)
    step.to(device)
    result = fit(model, train.to(device), data.dt, step=step, config=case.training, checkpoint_dir=out / "checkpoints",
                 resume=resume, progress=progress)
    model.cpu()
    step.cpu()

    model.eval()
    rmse = forecast_rmse(model, test, data.dt, sorted(set(case.metrics.leads) | set(case.metrics.curve_leads)), step)
    n_lyap = case.metrics.lyapunov_trajectories
    lyap_x0 = test[:: max(1, test.shape[0] // n_lyap)][:n_lyap]
    lyap_learned, _ = lyapunov_max(model, lyap_x0, data.dt, step, n_steps=case.metrics.lyapunov_steps, seed=case.seed)
    lyap_true, _ = lyapunov_max(truth_model, lyap_x0, data.dt, step.tableau.name, n_steps=case.metrics.lyapunov_steps,
                                seed=case.seed)

    with torch.no_grad():
        n_forecast = min(case.metrics.forecast_steps, data.n_test)
        forecast = rollout(model, test[0], n_forecast, data.dt, step, nonfinite="keep")
        attractor = rollout(model, test[0], data.n_test, data.dt, step, nonfinite="keep")
    times = data.dt * torch.arange(n_forecast + 1, dtype=torch.float64)
    units = {"long_name": "", "units": "1"}
    ds = trajectory_to_dataset(
        {"truth": test[: n_forecast + 1], "forecast": forecast},
        times,
        truth_model.component_names(),
        variable_attrs={
            "truth": {**units, "long_name": f"true {truth_model.name} state (test trajectory)"},
            "forecast": {**units, "long_name": "free forecast of the learned model from the first test state"},
        },
        attrs={
            "title": f"geonn case {case.name}: learned forecast vs truth",
            "Conventions": "CF-1.8",
            "source": "geonn",
            "case": case.name,
            "dt": data.dt,
            "scheme": step.tableau.name,
            "operator": case.model.operator,
        },
    )
    leads = sorted(rmse)
    ds["rmse"] = ("lead", [rmse[k] for k in leads], {"long_name": "forecast RMSE over test starts and components", "units": "1"})
    ds = ds.assign_coords(
        lead=("lead", leads, {"long_name": "forecast lead", "units": "steps"}),
        lead_time=("lead", [k * data.dt for k in leads], {"long_name": "forecast lead time", "units": "model time units"}),
    )
    write_netcdf(ds, out / "forecast.nc")

    figures = out / "figures"
    plotting.attractor(test.numpy(), attractor.numpy(), figures / "attractor.png", labels=truth_model.component_names())
    plotting.rmse_by_lead(leads, [rmse[k] for k in leads], data.dt, figures / "rmse_by_lead.png")
    plotting.forecast_series(times.numpy(), test[: n_forecast + 1].numpy(), forecast.numpy(), figures / "forecast.png",
                             labels=truth_model.component_names())

    metrics = {f"rmse_lead{k}": rmse[k] for k in case.metrics.leads}
    metrics.update(
        lyapunov_max=lyap_learned,
        lyapunov_max_true=lyap_true,
        train_seconds=result.train_seconds,
        final_loss=result.final_loss,
        n_params=sum(p.numel() for p in [*model.parameters(), *step.parameters()] if p.requires_grad),
        case_seconds=time.perf_counter() - started,
    )
    return metrics


def check_expected(case: IdentificationCase, metrics: dict) -> list[tuple[str, float, float, bool]]:
    """Compare metrics with the case's recorded targets: rows of (name, value, bound, met)."""
    rows = []
    for name, bound in case.expected.max.items():
        value = metrics.get(name)
        if value is not None:
            rows.append((name, float(value), float(bound), float(value) <= float(bound)))
    if case.expected.lyapunov_abs_error_max is not None:
        error = abs(metrics["lyapunov_max"] - metrics["lyapunov_max_true"])
        rows.append(("|lyapunov_max - lyapunov_max_true|", error, case.expected.lyapunov_abs_error_max,
                     error <= case.expected.lyapunov_abs_error_max))
    return rows


CONFIG = IdentificationCase
run = run_identification
