"""Transport cases: a point-wise loss alone vs the same loss plus an optimal-transport term on rollouts.

Both trainings learn the same operator (an MLP inside an RK4 step) on the same data with the same
optimiser, schedule, batch order and number of epochs. The point-wise training minimises the
normalised one-step squared error ``L_pw``. The transport training adds, from epoch
``start_epoch`` on and on every ``every``-th batch, the term

    L_ot = D( {rollout states}, {true attractor samples} )

where the rollouts are ``rollout_steps``-step free runs of the learned model from
``rollout_starts`` random training states, differentiated through every step, and ``D`` is the
sliced Wasserstein distance (squared, ``SW_2^2``) or the Sinkhorn divergence (``~W_2^2``) between
the set of all their states and ``target_samples`` random training states, all standardised by
the training data's mean and standard deviation. With ``balance = true`` (default) such a step
follows ``grad L_pw + weight |grad L_pw| / |grad L_ot| grad L_ot``: the transport gradient, which
through a 100-step rollout is hundreds of times larger than the one-step gradient and would
otherwise take over Adam's moment estimates, pulls with ``weight`` times the point-wise
gradient's norm (gradient-norm balancing, wang2021). With ``balance = false`` the loss is
``L_pw + weight L_ot``. Every random draw (starts, targets, projection directions) is seeded by
the optimiser step, so a resumed run repeats it.

The attractor is scored on the models themselves, not on data: ``sliced_w_attractor`` is the
sliced 2-Wasserstein distance (state units) between the states of 10^4-step runs of the learned
model and of the true model from the same test states (every ``sample_every``-th state of each
run); ``sliced_w_attractor_floor`` is the same distance between two sets of true runs from
different starts (what finite sampling alone gives).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..fields import trajectory_to_dataset
from ..integrators import GRADIENTS, RungeKuttaStep, get_tableau, rollout
from ..io import write_figure, write_netcdf
from ..losses import sinkhorn_divergence, sliced_wasserstein
from ..metrics import forecast_rmse, lyapunov_max
from ..operators import MLP, Standardised
from ..training import TrainConfig
from .identification import DataConfig, simulate_data
from .objective_fit import fit_objective

DISTANCES = ("sliced", "sinkhorn")


@dataclass
class TransportData(DataConfig):
    """The identification data, observed with Gaussian noise of std ``obs_noise_std`` (state units) on every component."""

    obs_noise_std: float = 1.0
    noise_seed: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.obs_noise_std) and self.obs_noise_std >= 0):
            raise ConfigError(f"data.obs_noise_std: expected a noise std >= 0, got {self.obs_noise_std}")


@dataclass
class TransportModel:
    """The learned operator (an MLP) and its scheme."""

    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    scheme: str = "rk4"

    def __post_init__(self):
        try:
            get_tableau(self.scheme)
        except ValueError as err:
            raise ConfigError(f"model.scheme: {err}") from None


@dataclass
class TransportTerm:
    """The optimal-transport term added to the point-wise loss (dimensionless: on standardised states)."""

    distance: str = "sliced"
    weight: float = 4.0
    start_epoch: int = 5
    every: int = 4
    rollout_steps: int = 100
    rollout_starts: int = 256
    target_samples: int = 2048
    n_projections: int = 64
    blur: float = 0.05
    gradient: str = "backprop"
    balance: bool = True  # weight is the ratio of the transport gradient's norm to the point-wise one's
    clip_grad_norm: float | None = None  # applied to both trainings (the same optimiser for both)
    seed: int = 0

    def __post_init__(self):
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise ConfigError(f"transport.clip_grad_norm: expected a norm > 0, got {self.clip_grad_norm}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"transport.distance: expected one of {DISTANCES}, got {self.distance!r}")
        if self.gradient not in GRADIENTS:
            raise ConfigError(f"transport.gradient: expected one of {GRADIENTS}, got {self.gradient!r}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"transport.weight: expected a weight > 0, got {self.weight}")
        if not self.blur > 0:
            raise ConfigError(f"transport.blur: expected a length > 0, got {self.blur}")
        if self.start_epoch < 0:
            raise ConfigError(f"transport.start_epoch: expected >= 0, got {self.start_epoch}")
        for name in ("every", "rollout_steps", "rollout_starts", "target_samples", "n_projections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transport.{name}: expected >= 1, got {getattr(self, name)}")


@dataclass
class TransportMetrics:
    """Attractor distance, Lyapunov exponent and short-range RMSE, on the test trajectory's states."""

    attractor_steps: int = 10000
    attractor_starts: int = 10
    sample_every: int = 10  # states of the runs kept for the distance (every 0.1 time units at dt = 0.01)
    n_projections: int = 256
    leads: list[int] = field(default_factory=lambda: [1, 4, 8])
    lyapunov_steps: int = 10000
    lyapunov_trajectories: int = 8
    lyapunov_spinup: int = 1000
    starts_from: str = "test"  # "train": score from the clean training trajectory (for tuning, never the test)
    seed: int = 0

    def __post_init__(self):
        if self.starts_from not in ("test", "train"):
            raise ConfigError(f"metrics.starts_from: expected 'test' or 'train', got {self.starts_from!r}")
        if self.attractor_steps < 10 or min(self.attractor_starts, self.n_projections, self.sample_every) < 1:
            raise ConfigError("metrics.attractor_steps (>= 10), attractor_starts, sample_every, n_projections (>= 1): out of range")
        if not self.leads or min(self.leads) < 1:
            raise ConfigError(f"metrics.leads: expected lead times >= 1 step, got {self.leads}")


@dataclass
class TransportExpected:
    """Targets and their source: the OT training's attractor distance relative to the point-wise one's."""

    source: str = ""
    attractor_ratio_max: float = 1.0  # sliced_w_attractor_ot / sliced_w_attractor_pointwise


@dataclass
class TransportCase:
    """A whole transport case (one TOML file in ``cases/``)."""

    name: str
    kind: str = "transport"
    description: str = ""
    seed: int = 0
    data: TransportData = field(default_factory=TransportData)
    model: TransportModel = field(default_factory=TransportModel)
    training: TrainConfig = field(default_factory=TrainConfig)
    transport: TransportTerm = field(default_factory=TransportTerm)
    metrics: TransportMetrics = field(default_factory=TransportMetrics)
    expected: TransportExpected = field(default_factory=TransportExpected)

    def __post_init__(self):
        if self.training.refine != "none" or self.training.unroll != 1:
            raise ConfigError("training.refine, training.unroll: the transport case trains with Adam on one-step pairs; "
                              f"expected 'none' and 1, got {self.training.refine!r} and {self.training.unroll}")
        if self.transport.start_epoch >= self.training.epochs:
            raise ConfigError(f"transport.start_epoch: expected fewer than training.epochs ({self.training.epochs}) so the "
                              f"term is used, got {self.transport.start_epoch}")


def observe(case: TransportCase):
    """The true model, the noisy training trajectory, the clean training trajectory and the clean test trajectory."""
    truth, clean, test = simulate_data(case.data)
    generator = torch.Generator().manual_seed(case.data.noise_seed)
    noisy = clean + case.data.obs_noise_std * torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
    return truth, noisy, clean, test


def train_model(case: TransportCase, train: torch.Tensor, *, with_transport: bool, checkpoint_path: Path | None,
                resume: bool = False, progress: bool = True):
    """Train the case's MLP on ``train`` ``(time, d)``; with the transport term or without. Returns (model, step, result)."""
    dt, term = case.data.dt, case.transport
    d = train.shape[-1]
    torch.manual_seed(case.seed)
    operator = MLP(d, tuple(case.model.hidden), case.model.activation).double()
    increments = (train[1:] - train[:-1]) / dt
    mean, scale = train.mean(0), train.std(0)
    model = Standardised(operator, mean, scale, increments.std(0))
    step = RungeKuttaStep(case.model.scheme)
    starts, targets = train[:-1], train[1:]
    n_batches = math.ceil(starts.shape[0] / case.training.batch_size)
    first_transport_step = term.start_epoch * n_batches
    zero = torch.zeros((), dtype=train.dtype)
    if term.rollout_steps >= train.shape[0]:
        raise ConfigError(f"transport.rollout_steps: expected fewer than the {train.shape[0]} training states, got {term.rollout_steps}")

    def transport_loss(step_number):
        generator = torch.Generator().manual_seed(term.seed * 1_000_003 + step_number)
        begin = torch.randint(0, train.shape[0], (term.rollout_starts,), generator=generator)
        runs = rollout(model, train[begin], term.rollout_steps, dt, step, gradient=term.gradient)[1:]
        states = ((runs - mean) / scale).reshape(-1, d)
        reference = (train[torch.randint(0, train.shape[0], (term.target_samples,), generator=generator)] - mean) / scale
        if term.distance == "sliced":
            return sliced_wasserstein(states, reference, term.n_projections, seed=term.seed * 1_000_003 + step_number)
        return sinkhorn_divergence(states, reference, blur=term.blur)

    def loss(idx, step_number):
        pred = step(model, zero, starts[idx], dt)
        value = ((pred - targets[idx]) / scale).pow(2).mean()
        if with_transport and step_number >= first_transport_step and (step_number - first_transport_step) % term.every == 0:
            if term.balance:  # the transport gradient rescaled to `weight` times the point-wise one's norm
                return value, transport_loss(step_number), term.weight
            value = value + term.weight * transport_loss(step_number)
        return value

    label = "pointwise + transport" if with_transport else "pointwise"
    result = fit_objective({"model": model}, loss, starts.shape[0], case.training, checkpoint_path=checkpoint_path,
                           resume=resume, progress=progress, desc=label, max_grad_norm=term.clip_grad_norm)
    model.eval()
    return model, step, result


def attractor_distance(a: torch.Tensor, b: torch.Tensor, n_projections: int, seed: int) -> float:
    """Sliced 2-Wasserstein distance (state units) between the states of two sets of runs ``(time, runs, d)``.

    Runs (or single states) that hold NaN or inf are left out; ``nan`` when none is left.
    """
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    a = a[torch.isfinite(a).all(-1)]
    b = b[torch.isfinite(b).all(-1)]
    if a.shape[0] == 0 or b.shape[0] == 0:
        return float("nan")
    with torch.no_grad():
        return math.sqrt(max(0.0, float(sliced_wasserstein(a, b, n_projections, seed=seed))))


def _lyapunov(model, x0, dt, step, metrics: TransportMetrics, seed: int) -> float:
    try:
        return lyapunov_max(model, x0, dt, step, n_steps=metrics.lyapunov_steps, spinup_steps=metrics.lyapunov_spinup, seed=seed)[0]
    except InputError:  # a run diverged
        return float("nan")


def run_transport(case: TransportCase, out: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Run both trainings, score them, write ``attractor.nc`` and figures; return the metrics."""
    started = time.perf_counter()
    data, metrics_config = case.data, case.metrics
    truth, noisy, clean, test = observe(case)
    if metrics_config.starts_from == "train":
        test = clean
    checkpoints = out / "checkpoints"
    trained = {}
    for label, with_transport in (("pointwise", False), ("ot", True)):
        trained[label] = train_model(case, noisy, with_transport=with_transport, checkpoint_path=checkpoints / f"{label}.pt",
                                     resume=resume, progress=progress)

    # Long runs of each model and of the truth from the same evenly spaced test states.
    n_runs = metrics_config.attractor_starts
    spacing = max(1, test.shape[0] // n_runs)
    x0 = test[::spacing][:n_runs]
    x0_other = test[spacing // 2 :: spacing][:n_runs]  # the truth again from other states: the sampling floor
    steps_n, dt = metrics_config.attractor_steps, data.dt
    true_step = RungeKuttaStep(case.model.scheme)
    with torch.no_grad():
        runs = {"truth": rollout(truth, x0, steps_n, dt, true_step)}
        runs_other = rollout(truth, x0_other, steps_n, dt, true_step)
        for label, (model, step, _) in trained.items():
            runs[label] = rollout(model, x0, steps_n, dt, step, nonfinite="keep")
    seed, every, n_projections = metrics_config.seed, metrics_config.sample_every, metrics_config.n_projections
    distance = {label: attractor_distance(runs[label][::every], runs["truth"][::every], n_projections, seed) for label in trained}
    floor = attractor_distance(runs_other[::every], runs["truth"][::every], n_projections, seed)

    n_lyap = metrics_config.lyapunov_trajectories
    lyap_x0 = test[:: max(1, test.shape[0] // n_lyap)][:n_lyap]
    lyapunov = {label: _lyapunov(model, lyap_x0, dt, step, metrics_config, case.seed) for label, (model, step, _) in trained.items()}
    lyapunov["true"] = _lyapunov(truth, lyap_x0, dt, true_step, metrics_config, case.seed)
    rmse = {label: forecast_rmse(model, test, dt, metrics_config.leads, step, nonfinite="keep") for label, (model, step, _) in trained.items()}

    _write_outputs(case, out, truth, runs, distance, floor)

    metrics = {}
    for label, (_, _, result) in trained.items():
        metrics[f"sliced_w_attractor_{label}"] = distance[label]
        metrics[f"lyapunov_max_{label}"] = lyapunov[label]
        for k in metrics_config.leads:
            metrics[f"rmse_lead{k}_{label}"] = rmse[label][k]
        metrics[f"train_seconds_{label}"] = result.train_seconds
        metrics[f"final_loss_{label}"] = result.final_loss
        metrics[f"diverged_runs_{label}"] = int((~torch.isfinite(runs[label]).all(-1).all(0)).sum())
    metrics.update(
        sliced_w_attractor_floor=floor,
        lyapunov_max_true=lyapunov["true"],
        attractor_improvement=1 - distance["ot"] / distance["pointwise"],
        case_seconds=time.perf_counter() - started,
    )
    return metrics


def _write_outputs(case, out, truth, runs, distance, floor) -> None:
    data, n = case.data, case.metrics.attractor_steps
    times = data.dt * torch.arange(n + 1, dtype=torch.float64)
    first = {label: run[:, 0] for label, run in runs.items()}
    ds = trajectory_to_dataset(
        first,
        times,
        truth.component_names(),
        variable_attrs={
            "truth": {"long_name": f"true {truth.name} run from the first test state", "units": "1"},
            "pointwise": {"long_name": "run of the model trained with the point-wise loss alone", "units": "1"},
            "ot": {"long_name": "run of the model trained with the point-wise loss plus the optimal-transport term", "units": "1"},
        },
        attrs={
            "title": f"geonn case {case.name}: attractors of the point-wise and transport-trained models vs truth",
            "Conventions": "CF-1.8",
            "source": "geonn",
            "case": case.name,
            "dt": data.dt,
            "obs_noise_std": data.obs_noise_std,
            "scheme": case.model.scheme,
            "transport_distance": case.transport.distance,
            "transport_weight": case.transport.weight,
            "sliced_w_attractor_pointwise": distance["pointwise"],
            "sliced_w_attractor_ot": distance["ot"],
            "sliced_w_attractor_floor": floor,
        },
    )
    write_netcdf(ds, out / "attractor.nc")
    _attractor_figure({label: run.numpy() for label, run in runs.items()}, distance, floor, truth.component_names(),
                      out / "figures" / "attractors.png", n)


def _attractor_figure(runs, distance, floor, labels, path, n_steps):
    """x-z projections (truth, point-wise, transport) over the truth, and the marginal densities.

    ``runs``: label -> states ``(time, runs, d)``; the projections draw every 5th time of every run,
    the densities all states.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    titles = {
        "truth": f"true model (sampling floor {floor:.2f})",
        "pointwise": f"point-wise loss: SW = {distance['pointwise']:.2f}",
        "ot": f"point-wise + OT: SW = {distance['ot']:.2f}",
    }
    colours = {"truth": "k", "pointwise": "tab:blue", "ot": "tab:red"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    states = {label: run.reshape(-1, run.shape[-1]) for label, run in runs.items()}
    thinned = {label: run[::5].reshape(-1, run.shape[-1]) for label, run in runs.items()}
    truth = states["truth"]
    for ax, label in zip(axes[0], ("truth", "pointwise", "ot")):
        points = thinned[label]
        points = points[np.isfinite(points).all(-1)]
        if label != "truth":
            ax.plot(thinned["truth"][:, 0], thinned["truth"][:, 2], ",", color="0.75")
        ax.plot(points[:, 0], points[:, 2], ",", color=colours[label])
        ax.set_xlabel(labels[0]), ax.set_ylabel(labels[2])
        ax.set_title(titles[label], fontsize=10)
    for i, ax in enumerate(axes[1]):
        bins = np.linspace(truth[:, i].min() - 5, truth[:, i].max() + 5, 80)
        for label in ("truth", "pointwise", "ot"):
            values = states[label][:, i]
            values = values[np.isfinite(values)]
            ax.hist(values, bins=bins, density=True, histtype="step", color=colours[label], lw=1.3,
                    label={"truth": "true model", "pointwise": "point-wise", "ot": "point-wise + OT"}[label])
        ax.set_xlabel(labels[i]), ax.set_ylabel("density")
    axes[1][0].legend(fontsize=8)
    fig.suptitle(f"Attractors from {n_steps}-step runs from the same states (SW: sliced 2-Wasserstein distance to the truth)")
    fig.tight_layout()
    return write_figure(fig, path)


def check_expected(case: TransportCase, metrics: dict) -> list[tuple[str, float, float, bool]]:
    """Rows of (name, value, bound, met): the OT training's attractor distance relative to the point-wise one's."""
    ot, pointwise = metrics.get("sliced_w_attractor_ot"), metrics.get("sliced_w_attractor_pointwise")
    if ot is None or not pointwise:
        return []
    ratio = ot / pointwise
    return [("sliced_w_attractor_ot / sliced_w_attractor_pointwise", ratio, case.expected.attractor_ratio_max,
             ratio <= case.expected.attractor_ratio_max)]


CONFIG = TransportCase
run = run_transport
