"""Partial cases: latent dynamics from one observed component (ouala2020).

Only one component of the reference model is observed (exactly, every ``dt``). The learned model
runs on an augmented state of dimension ``dE``: the observed component plus ``dE - 1`` latent ones.
The latent trajectory and the operator (a bilinear network in an RK4 step) are estimated together
with :func:`geonn.joint.estimate_jointly`: the observed component is held at the observations and
the cost is the dynamical misfit of the whole augmented trajectory.

The joint problem is not convex in the latent trajectory; where it starts decides what it finds.
The latent components start from features of the observed series, in the order of
``embedding.features``: its time derivative (Savitzky-Golay), squares of delayed values
``x(t - j tau)^2`` and delayed values ``x(t - j tau)`` (a polynomial delay embedding), each
standardised, plus a seeded perturbation of relative size ``latent_noise``. The operator is
pre-trained on this initial augmented trajectory (one-step loss) before the joint estimate.

Forecasts are scored as in ouala2020: at each test start the latent components are unknown, so
they are inferred by the same cost with the operator held, over the ``window_steps`` observations
up to the start (nothing after it), from an initial guess given by a linear regression of the
training latents on quadratic features of delayed observations. The forecast of the observed
component from the inferred state is compared with the truth at each lead. The largest Lyapunov
exponent is that of the learned augmented model, from inferred training states.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from scipy.signal import savgol_filter

from ..errors import ConfigError, InputError
from ..integrators import RungeKuttaStep, get_tableau, rollout
from ..io import write_figure, write_netcdf
from ..joint import JointConfig, estimate_jointly
from ..metrics import lyapunov_max
from ..operators import BilinearResidual, Standardised
from ..training import TrainConfig, fit
from .identification import DataConfig, simulate_data

FEATURES = ("derivative", "second_derivative", "lag", "square_lag", "noise")


@dataclass
class PartialData(DataConfig):
    """The identification data, of which only ``observed_component`` is seen (exactly)."""

    n_train: int = 4000
    n_test: int = 1000
    observed_component: int = 0


def _check_feature(name: str, key: str) -> None:
    base = name.rstrip("0123456789")
    if base not in FEATURES or (base in ("lag", "square_lag") and (base == name or int(name[len(base):]) < 1)):
        raise ConfigError(f"{key}: expected one of derivative, second_derivative, noise, lagJ or square_lagJ (J >= 1), got {name!r}")


@dataclass
class Embedding:
    """The augmented dimensions and seeds of the runs, and how the latent components start."""

    dimensions: list[int] = field(default_factory=lambda: [3, 4, 6])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    features: list[str] = field(default_factory=lambda: ["derivative", "square_lag1", "square_lag2", "lag1", "lag2"])
    lag_steps: int = 10               # tau, in steps of dt
    derivative_window: int = 9        # Savitzky-Golay window (steps) and polynomial order of the derivatives
    derivative_order: int = 5
    latent_noise: float = 0.1         # seeded Gaussian perturbation of the standardised features

    def __post_init__(self):
        if not self.dimensions or min(self.dimensions) < 2:
            raise ConfigError(f"embedding.dimensions: expected augmented dimensions >= 2, got {self.dimensions}")
        if not self.seeds:
            raise ConfigError("embedding.seeds: expected at least one seed, got []")
        for i, name in enumerate(self.features):
            _check_feature(name, f"embedding.features[{i}]")
        if len(self.features) < max(self.dimensions) - 1:
            raise ConfigError(f"embedding.features: expected at least {max(self.dimensions) - 1} features for dimension "
                              f"{max(self.dimensions)}, got {len(self.features)}")
        if self.lag_steps < 1:
            raise ConfigError(f"embedding.lag_steps: expected >= 1, got {self.lag_steps}")
        if self.derivative_window % 2 == 0 or not 2 <= self.derivative_order < self.derivative_window:
            raise ConfigError(f"embedding.derivative_window/derivative_order: expected an odd window above an order >= 2, "
                              f"got {self.derivative_window} and {self.derivative_order}")
        if not (math.isfinite(self.latent_noise) and self.latent_noise >= 0):
            raise ConfigError(f"embedding.latent_noise: expected >= 0, got {self.latent_noise}")


@dataclass
class PartialModel:
    """The bilinear operator on the augmented state (``None``: as many units as ``dE``) and its scheme."""

    n_linear: int | None = None
    n_bilinear: int | None = None
    scheme: str = "rk4"

    def __post_init__(self):
        try:
            get_tableau(self.scheme)
        except ValueError as err:
            raise ConfigError(f"model.scheme: {err}") from None
        for name in ("n_linear", "n_bilinear"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: expected >= 1, got {getattr(self, name)}")


@dataclass
class Inference:
    """Latent states at test starts: the joint cost with the operator held, over a window before each start."""

    window_steps: int = 50
    every: int = 1                    # stride between test starts (steps)
    delay_count: int = 8              # the initial guess: regression on x(t), x(t - lag), ..., x(t - count lag)
    delay_lag: int = 2                # and their pairwise products
    model_std: float = 1e-3
    iterations: int = 20

    def __post_init__(self):
        for name in ("window_steps", "every", "delay_count", "delay_lag", "iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inference.{name}: expected >= 1, got {getattr(self, name)}")
        if not self.model_std > 0:
            raise ConfigError(f"inference.model_std: expected > 0, got {self.model_std}")


@dataclass
class PartialMetrics:
    leads: list[int] = field(default_factory=lambda: [1, 4])
    lyapunov_steps: int = 10000
    lyapunov_trajectories: int = 4
    figure_dimension: int | None = None   # the run drawn in the figures (default the first dimension, first seed)

    def __post_init__(self):
        if not self.leads or min(self.leads) < 1:
            raise ConfigError(f"metrics.leads: expected lead times >= 1 step, got {self.leads}")


@dataclass
class PartialExpected:
    """Targets: ``max`` bounds on metrics, and the exponents named in ``lyapunov_keys`` near a reference."""

    source: str = ""
    max: dict = field(default_factory=dict)
    lyapunov_keys: list[str] = field(default_factory=list)
    lyapunov_reference: float = 0.9
    lyapunov_abs_error_max: float | None = None
    published: dict = field(default_factory=dict)   # the reference's own figures, for the record


def _joint_default() -> JointConfig:
    return JointConfig(model_std=[1e-3], epochs_per_stage=4, iterations=40)


def _pretraining_default() -> TrainConfig:
    return TrainConfig(epochs=10, refine="lm", refine_epochs=1, refine_iterations=30)


@dataclass
class PartialCase:
    """A whole partial-observation case (one TOML file in ``cases/``)."""

    name: str
    kind: str = "partial"
    description: str = ""
    data: PartialData = field(default_factory=PartialData)
    embedding: Embedding = field(default_factory=Embedding)
    model: PartialModel = field(default_factory=PartialModel)
    pretraining: TrainConfig = field(default_factory=_pretraining_default)
    joint: JointConfig = field(default_factory=_joint_default)
    inference: Inference = field(default_factory=Inference)
    metrics: PartialMetrics = field(default_factory=PartialMetrics)
    expected: PartialExpected = field(default_factory=PartialExpected)


# -- latent initial guesses ------------------------------------------------------------------------


def _lagged(series: np.ndarray, steps: int) -> np.ndarray:
    return np.concatenate((np.full(steps, series[0]), series[:-steps]))


def initial_augmented(observed: torch.Tensor, dimension: int, embedding: Embedding, dt: float, seed: int) -> torch.Tensor:
    """The initial augmented trajectory ``(time, dimension)``: the observed series, then one standardised
    feature of it per latent component (scaled to the observed series' spread), plus seeded noise."""
    x = observed.numpy()
    generator = np.random.default_rng(seed)
    columns = [x]
    for name in embedding.features[: dimension - 1]:
        base = name.rstrip("0123456789")
        if base == "derivative":
            feature = savgol_filter(x, embedding.derivative_window, embedding.derivative_order, deriv=1, delta=dt)
        elif base == "second_derivative":
            feature = savgol_filter(x, embedding.derivative_window, embedding.derivative_order, deriv=2, delta=dt)
        elif base == "noise":
            feature = generator.standard_normal(x.size)
        else:
            lagged = _lagged(x, int(name[len(base):]) * embedding.lag_steps)
            feature = lagged**2 if base == "square_lag" else lagged
        feature = (feature - feature.mean()) / max(feature.std(), 1e-300)
        columns.append(x.std() * (feature + embedding.latent_noise * generator.standard_normal(x.size)))
    return torch.as_tensor(np.stack(columns, axis=1))


def _delay_features(series: torch.Tensor, count: int, lag: int, mean: float, std: float) -> torch.Tensor:
    """``[1, d_0..d_count, d_i d_j]`` with ``d_j = (x(t - j lag) - mean) / std``, for t >= count lag: ``(T - count lag, n)``."""
    z = (series - mean) / std
    span = count * lag
    delays = torch.stack([z[span - j * lag: z.shape[0] - j * lag] for j in range(count + 1)], dim=1)
    i, j = torch.triu_indices(count + 1, count + 1)
    return torch.cat((torch.ones(delays.shape[0], 1, dtype=z.dtype), delays, delays[:, i] * delays[:, j]), dim=1)


# -- one run -----------------------------------------------------------------------------------------


def _one_run(case: PartialCase, dimension: int, seed: int, train, test, out: Path, resume: bool, progress: bool) -> dict:
    """Learn the augmented model for one (dimension, seed); score it on the test trajectory."""
    data, inference = case.data, case.inference
    dt, k = data.dt, data.observed_component
    folder = out / "checkpoints" / f"dE{dimension}_seed{seed}"
    augmented = initial_augmented(train[:, k], dimension, case.embedding, dt, seed)
    torch.manual_seed(seed)
    operator = BilinearResidual(dimension, case.model.n_linear, case.model.n_bilinear).double()
    model = Standardised(operator, augmented.mean(0), augmented.std(0), ((augmented[1:] - augmented[:-1]) / dt).std(0))
    step = RungeKuttaStep(case.model.scheme)
    pre = fit(model, augmented, dt, step=step, config=case.pretraining, checkpoint_dir=folder / "pretraining", resume=resume,
              progress=progress)
    mask = torch.zeros(dimension, dtype=torch.bool)
    mask[0] = True
    observations = torch.full_like(augmented, math.nan)
    observations[:, 0] = augmented[:, 0]
    scale = augmented.std(0)
    joint = estimate_jointly(model, observations, dt, mask=mask, states=augmented, obs_std=0.0, dynamics_scale=scale,
                             step=step, config=case.joint, checkpoint_dir=folder / "joint", resume=resume, progress=progress)
    states = joint.states
    train_seconds = pre.train_seconds + joint.seconds  # as checkpointed, so a resumed run reports the same
    model.eval()

    # test: an initial guess of the latents from delayed observations, refined over a window before each start
    count, lag, window = inference.delay_count, inference.delay_lag, inference.window_steps
    mean, std = float(train[:, k].mean()), float(train[:, k].std())
    features = _delay_features(train[:, k], count, lag, mean, std)
    coefficients = torch.linalg.lstsq(features, states[count * lag:, 1:]).solution
    guess = _delay_features(test[:, k], count, lag, mean, std) @ coefficients  # latents at test times >= count lag
    max_lead = max(case.metrics.leads)
    starts = torch.arange(count * lag + window, test.shape[0] - max_lead, inference.every)
    if starts.numel() < 1:
        raise InputError(f"data.n_test: {data.n_test} steps leave no test start after a window of {window} steps "
                         f"and {count * lag} steps of delays; lengthen the test trajectory")
    offsets = torch.arange(-window, 1)
    times = starts[:, None] + offsets  # (n_starts, window + 1)
    windows = torch.cat((test[times, k].unsqueeze(-1), guess[times - count * lag]), dim=-1)
    window_obs = torch.full_like(windows, math.nan)
    window_obs[..., 0] = windows[..., 0]
    held = JointConfig(model_std=[inference.model_std], iterations=inference.iterations, horizons=case.joint.horizons,
                       train_model=False)
    inferred = estimate_jointly(model, window_obs, dt, mask=mask, states=windows, obs_std=0.0, dynamics_scale=scale, step=step,
                                config=held, checkpoint_dir=folder / "inference", resume=resume, progress=progress).states
    with torch.no_grad():
        forecast = rollout(model, inferred[:, -1], max_lead, dt, step, nonfinite="keep")  # (max_lead + 1, n_starts, dE)
    rmse = {lead: float((forecast[lead, :, 0] - test[starts + lead, k]).pow(2).mean().sqrt()) for lead in case.metrics.leads}

    n_lyap = case.metrics.lyapunov_trajectories
    lyap_starts = states[:: max(1, states.shape[0] // n_lyap)][:n_lyap]
    try:
        lyap = lyapunov_max(model, lyap_starts, dt, step, n_steps=case.metrics.lyapunov_steps,
                            spinup_steps=min(1000, case.metrics.lyapunov_steps), seed=seed)[0]
    except InputError:  # the learned model's trajectories diverged
        lyap = math.nan
    # how far the latents are from an affine image of the unobserved truth (a diagnostic, not a score)
    hidden = [i for i in range(train.shape[1]) if i != k]
    design = torch.cat((states, torch.ones(states.shape[0], 1, dtype=states.dtype)), dim=1)
    fitted = design @ torch.linalg.lstsq(design, train[:, hidden]).solution
    with torch.no_grad():
        one_step = (step(model, 0.0, states[:-1], dt) - states[1:])[:, 0]
    return {
        "rmse": rmse, "lyapunov_max": lyap, "train_seconds": train_seconds,
        "train_one_step_rmse": float(one_step.pow(2).mean().sqrt()),
        "latent_affine_rmse": float((fitted - train[:, hidden]).pow(2).mean().sqrt()),
        "states": states, "model": model, "step": step,
    }


# -- the case ------------------------------------------------------------------------------------------


def run_partial(case: PartialCase, out: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Run every (dimension, seed) into ``out`` (``runs.nc``, ``reconstruction.nc``, figures); return the metrics."""
    started = time.perf_counter()
    data = case.data
    truth_model, train, test = simulate_data(data)
    if not 0 <= data.observed_component < truth_model.state_dim:
        raise ConfigError(f"data.observed_component: expected 0 to {truth_model.state_dim - 1}, got {data.observed_component}")
    dims, seeds, leads = case.embedding.dimensions, case.embedding.seeds, case.metrics.leads
    runs = {(d, s): _one_run(case, d, s, train, test, out, resume, progress) for d in dims for s in seeds}

    shown = case.metrics.figure_dimension or dims[0]
    if shown not in dims:
        raise ConfigError(f"metrics.figure_dimension: expected one of {dims}, got {shown}")
    names = truth_model.component_names()
    ds = xr.Dataset(
        {
            "rmse": (("dimension", "seed", "lead"), np.array([[[runs[d, s]["rmse"][k] for k in leads] for s in seeds] for d in dims]),
                     {"long_name": f"RMSE of forecasts of {names[data.observed_component]} from inferred augmented test states",
                      "units": "1"}),
            "lyapunov_max": (("dimension", "seed"), np.array([[runs[d, s]["lyapunov_max"] for s in seeds] for d in dims]),
                             {"long_name": "largest Lyapunov exponent of the learned augmented model", "units": "1/(model time unit)"}),
            "latent_affine_rmse": (("dimension", "seed"), np.array([[runs[d, s]["latent_affine_rmse"] for s in seeds] for d in dims]),
                                   {"long_name": "RMSE of the best affine map from the inferred augmented training states to the "
                                                 "unobserved true components", "units": "1"}),
            "train_one_step_rmse": (("dimension", "seed"), np.array([[runs[d, s]["train_one_step_rmse"] for s in seeds] for d in dims]),
                                    {"long_name": "one-step misfit of the observed component on the inferred training states",
                                     "units": "1"}),
            "train_seconds": (("dimension", "seed"), np.array([[runs[d, s]["train_seconds"] for s in seeds] for d in dims]),
                              {"long_name": "time spent in pre-training and joint estimation epochs", "units": "s"}),
        },
        coords={"dimension": ("dimension", dims, {"long_name": "augmented state dimension dE", "units": "1"}),
                "seed": ("seed", seeds, {"long_name": "seed of the operator's weights and the latent perturbation"}),
                "lead": ("lead", leads, {"long_name": "forecast lead", "units": "steps"})},
        attrs={"title": f"geonn case {case.name}: latent augmented models from one observed component", "Conventions": "CF-1.8",
               "source": "geonn", "case": case.name, "dt": data.dt, "observed_component": names[data.observed_component]},
    )
    write_netcdf(ds, out / "runs.nc")

    times = data.dt * np.arange(train.shape[0])
    recon = xr.Dataset(
        {"truth": (("time", "component"), train.numpy(), {"long_name": f"true {truth_model.name} state (training)", "units": "1"})},
        coords={"time": ("time", times, {"long_name": "time", "units": "model time units", "axis": "T"}),
                "component": ("component", np.asarray(names))},
        attrs={"title": f"geonn case {case.name}: augmented training states inferred with the learned models (first seed)",
               "Conventions": "CF-1.8", "source": "geonn", "case": case.name, "seed": seeds[0]},
    )
    for d in dims:
        recon[f"augmented_dE{d}"] = ((("time", f"augmented_component_dE{d}")), runs[d, seeds[0]]["states"].numpy(),
                                     {"long_name": f"inferred augmented state, dE = {d} (component 0 is the observed one)",
                                      "units": "1"})
    write_netcdf(recon, out / "reconstruction.nc")

    figures = out / "figures"
    run = runs[shown, seeds[0]]
    with torch.no_grad():
        free = rollout(run["model"], run["states"][-1], min(5000, train.shape[0]), data.dt, run["step"], nonfinite="keep")
    _attractor_figure(train.numpy(), run["states"].numpy(), free.numpy(), data.observed_component, names, shown,
                      figures / "latent_attractor.png")
    _rmse_figure(ds, case.expected.published, figures / "rmse_by_dimension.png")

    metrics = {}
    for d in dims:
        for key, values in [*((f"rmse_lead{k}", [runs[d, s]["rmse"][k] for s in seeds]) for k in leads),
                            ("lyapunov_max", [runs[d, s]["lyapunov_max"] for s in seeds]),
                            ("latent_affine_rmse", [runs[d, s]["latent_affine_rmse"] for s in seeds])]:
            ranked = [v if math.isfinite(v) else math.inf for v in values]  # a diverged run ranks last
            metrics[f"dE{d}_{key}_median"] = statistics.median(ranked)
            metrics[f"dE{d}_{key}_min"] = min(ranked)
            metrics[f"dE{d}_{key}_max"] = max(ranked)
        metrics[f"dE{d}_diverged_runs"] = sum(not math.isfinite(runs[d, s]["lyapunov_max"]) for s in seeds)
        metrics[f"dE{d}_train_seconds_median"] = statistics.median(runs[d, s]["train_seconds"] for s in seeds)
    metrics.update(n_runs=len(runs), case_seconds=time.perf_counter() - started)
    return metrics


def _attractor_figure(truth, augmented, free, observed, names, dimension, path: Path) -> Path:
    import matplotlib.pyplot as plt

    hidden = [i for i in range(truth.shape[1]) if i != observed]
    fig = plt.figure(figsize=(13, 4.4))
    panels = [
        (truth[:, [observed, *hidden[:2]]], "black", f"observed {names[observed]} with the unobserved truth",
         [names[observed], *(f"{names[i]} (not observed)" for i in hidden[:2])]),
        (augmented[:, :3], "tab:red", f"reconstructed: {names[observed]} with inferred latents (dE = {dimension})",
         [names[observed], "latent 1", "latent 2"]),
        (free[:, :3], "tab:blue", "free run of the learned augmented model", [names[observed], "latent 1", "latent 2"]),
    ]
    for n, (points, colour, title, labels) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 3, n, projection="3d")
        ax.plot(*points.T, lw=0.3, color=colour)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(labels[0], fontsize=8), ax.set_ylabel(labels[1], fontsize=8), ax.set_zlabel(labels[2], fontsize=8)
    fig.suptitle("Observed vs reconstructed latent attractor (training period)")
    return write_figure(fig, path)


def _rmse_figure(ds: xr.Dataset, published: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    leads = [int(v) for v in ds.lead.values]
    fig, axes = plt.subplots(1, len(leads), figsize=(4.5 * len(leads), 3.8), squeeze=False)
    for ax, lead in zip(axes[0], leads):
        for i, d in enumerate(ds.dimension.values):
            values = ds.rmse.sel(dimension=d, lead=lead).values
            ax.semilogy(np.full(values.shape, i) + np.linspace(-0.1, 0.1, values.size), values, "o", color="tab:red")
        reference = published.get(f"dE3_rmse_lead{lead}")
        if reference is not None and 3 in ds.dimension.values:
            ax.semilogy([list(ds.dimension.values).index(3)], [reference], "k*", ms=12, label="ouala2020, dE = 3")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(range(ds.dimension.size), [f"dE = {d}" for d in ds.dimension.values])
        ax.set_title(f"lead {lead} (one point per seed)")
        ax.set_ylabel("RMSE of the observed component")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return write_figure(fig, path)


def check_expected(case: PartialCase, metrics: dict) -> list[tuple[str, float, float, bool]]:
    """Compare metrics with the case's recorded targets: rows of (name, value, bound, met)."""
    rows = []
    for name, bound in case.expected.max.items():
        value = metrics.get(name)
        if value is not None:
            rows.append((name, float(value), float(bound), float(value) <= float(bound)))
    if case.expected.lyapunov_abs_error_max is not None:
        for key in case.expected.lyapunov_keys:
            if metrics.get(key) is None:
                continue
            error = abs(float(metrics[key]) - case.expected.lyapunov_reference)
            rows.append((f"|{key} - {case.expected.lyapunov_reference}|", error, case.expected.lyapunov_abs_error_max,
                         error <= case.expected.lyapunov_abs_error_max))
    return rows


CONFIG = PartialCase
run = run_partial
