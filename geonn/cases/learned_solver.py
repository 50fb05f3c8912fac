"""Learned-solver cases (4DVarNet, fablet2021): train a learned variational solver on windows of
observations and score it beside 4D-Var and the ensemble Kalman smoother on the same test windows.

The runner integrates ``runs`` long runs of the reference model side by side, cuts training
windows from their first part and test windows from their last part (after ``gap_steps``),
observes every window (every ``every`` steps from its start, none in the first and last ``edge``
steps, Gaussian noise), then:

1. pretrains the prior's tendency F_theta on the true states of a few training windows (one-step
   loss, :func:`geonn.training.fit`), or loads it from an identification run (``prior.checkpoint``);
2. trains the :class:`~geonn.assimilation.learned.LearnedSolver` end to end
   (``checkpoints/solver.pt`` after every epoch; ``--resume`` continues);
3. reconstructs the test windows with it, with strong-constraint 4D-Var of the true model
   (:class:`~geonn.assimilation.windows.WindowVar4D`: quasi-static and all-at-once) and with the
   EnKS (:class:`~geonn.assimilation.windows.WindowEnKS`), all batched over windows;
4. writes ``windows.nc`` (the first ``save_windows`` test windows: truth, observations and every
   estimate, ``var4d`` for 4D-Var; ``rmse_by_step(estimate, step)`` over all scored test windows),
   ``figures/*.png`` and the
   metrics ``rmse_<method>`` (every step of every test window), ``rmse_<method>_interior``
   (the observed part, steps ``edge .. window - edge - 1``) and ``median_window_rmse_<method>``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import __version__
from ..assimilation.learned import DynamicalPrior, LearnedSolver, SolverTrainConfig
from ..assimilation.windows import WindowEnKS, WindowVar4D, cut_windows, interpolate_observations, observe_windows
from ..dynamics import MODELS
from ..errors import ConfigError
from ..integrators import RungeKuttaStep, rollout
from ..io import write_figure, write_netcdf
from ..operators import Standardised
from ..training import TrainConfig, fit
from .identification import ModelConfig, build_operator

METHODS = ("learned", "4dvar", "4dvar_plain", "enks", "first_guess")


@dataclass
class WindowDataConfig:
    """The long runs, the windows cut from them and how they are observed (model time units; state units)."""

    model: str = "lorenz63"
    model_parameters: dict = field(default_factory=dict)
    dt: float = 0.01
    window: int = 200
    every: int = 8
    edge: int = 10
    obs_error_std: float = math.sqrt(2.0)
    runs: int = 20
    spinup_steps: int = 1000
    train_windows: int = 10000
    validation_windows: int = 200
    test_windows: int = 2000
    train_stride: int = 20
    test_stride: int = 200
    gap_steps: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError(f"data.model: expected one of {sorted(MODELS)}, got {self.model!r}")
        if not self.dt > 0:
            raise ConfigError(f"data.dt: expected a positive step, got {self.dt}")
        if not (self.obs_error_std > 0 and math.isfinite(self.obs_error_std)):
            raise ConfigError(f"data.obs_error_std: expected a positive standard deviation, got {self.obs_error_std}")
        for name in ("window", "every", "runs", "train_windows", "test_windows", "train_stride", "test_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("edge", "spinup_steps", "validation_windows", "gap_steps", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}: expected an integer >= 0, got {getattr(self, name)}")
        if self.window < 2 or not any(self.edge <= k < self.window - self.edge for k in range(0, self.window, self.every)):
            raise ConfigError(f"data.window, data.every, data.edge: no observation left in a window of {self.window} steps "
                              f"observed every {self.every} with {self.edge} unobserved steps at each end")


@dataclass
class PriorConfig:
    """The prior ``Phi``: a learned tendency (``ModelConfig`` of the identification cases) in one
    Runge-Kutta step; pretrained on the true states of ``pretrain_windows`` training windows, or
    loaded from an identification run folder (``checkpoint``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain_windows: int = 30
    training: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=5, batch_size=256, learning_rate=1e-2, refine="lm", refine_epochs=2, refine_iterations=30))
    checkpoint: str = ""
    trainable: bool = True

    def __post_init__(self):
        if self.pretrain_windows < 0:
            raise ConfigError(f"prior.pretrain_windows: expected an integer >= 0, got {self.pretrain_windows}")


@dataclass
class SolverConfig:
    """The learned solver (:class:`~geonn.assimilation.learned.LearnedSolver`) and its number type."""

    iterations: int = 10
    hidden: int = 32
    kernel: int = 3
    downsample: int = 8
    local: int = 5
    step: float = 0.02
    prior_cost_weight: float = 1000.0
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("iterations", "hidden", "kernel", "downsample"):
            if getattr(self, name) < 1:
                raise ConfigError(f"solver.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.kernel % 2 == 0 or self.local < 0 or (self.local and self.local % 2 == 0):
            raise ConfigError(f"solver.kernel, solver.local: expected odd widths (local 0: none), got {self.kernel}, {self.local}")
        if not (self.step > 0 and self.prior_cost_weight > 0):
            raise ConfigError("solver.step, solver.prior_cost_weight: expected positive numbers")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"solver.dtype: expected 'float32' or 'float64', got {self.dtype!r}")


@dataclass
class BaselineConfig:
    """The baselines on the same test windows, with the true model.

    ``var4d_*``: strong-constraint 4D-Var with the climatological background (mean and covariance
    of the training windows' true states), quasi-static in ``var4d_stages`` stages; ``4dvar_plain``
    minimises from the same first guess with every observation at once (``var4d_plain = false``
    skips it). ``enks_*``: the EnKS from the climatology. ``windows``: how many test windows the
    baselines score (0: all).
    """

    var4d_stages: int = 22
    var4d_iterations: int = 20
    var4d_plain: bool = True
    var4d_plain_iterations: int = 30
    enks_members: int = 20
    enks_inflation: float = 1.0
    windows: int = 0
    batch_size: int = 500

    def __post_init__(self):
        for name in ("var4d_stages", "var4d_iterations", "var4d_plain_iterations", "enks_members", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"baselines.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.enks_members < 2 or not self.enks_inflation > 0 or self.windows < 0:
            raise ConfigError("baselines.enks_members >= 2, baselines.enks_inflation > 0, baselines.windows >= 0 expected")


@dataclass
class LearnedSolverExpected:
    """Published scores (``reference``), targets (``max``: metric <= bound) and the issue's
    ratio target (``learned_vs_4dvar_max``: ``rmse_learned / rmse_4dvar`` at most this)."""

    source: str = ""
    reference: dict = field(default_factory=dict)
    max: dict = field(default_factory=dict)
    learned_vs_4dvar_max: float | None = None


@dataclass
class LearnedSolverCase:
    """A whole learned-solver case (one TOML file in ``cases/``)."""

    name: str
    kind: str = "learned-solver"
    description: str = ""
    seed: int = 0
    save_windows: int = 100
    data: WindowDataConfig = field(default_factory=WindowDataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    training: SolverTrainConfig = field(default_factory=SolverTrainConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    expected: LearnedSolverExpected = field(default_factory=LearnedSolverExpected)


# --- data ----------------------------------------------------------------------------------------------


@dataclass
class WindowData:
    """Training, validation and test windows ``(windows, steps, D)`` with their observations (NaN = missing)."""

    truth_model: torch.nn.Module
    train: torch.Tensor
    train_values: torch.Tensor
    validation: torch.Tensor
    validation_values: torch.Tensor
    test: torch.Tensor
    test_values: torch.Tensor


def make_window_data(data: WindowDataConfig) -> WindowData:
    """Integrate the runs side by side and cut, select and observe the windows (seeded by ``data.seed``)."""
    model = MODELS[data.model](**data.model_parameters).double()
    generator = torch.Generator().manual_seed(data.seed)
    n_fit = data.train_windows + data.validation_windows
    per_run_train = math.ceil(n_fit / data.runs)
    per_run_test = math.ceil(data.test_windows / data.runs)
    train_steps = (per_run_train - 1) * data.train_stride + data.window
    test_steps = (per_run_test - 1) * data.test_stride + data.window
    x0 = model.default_initial_state() + torch.randn((data.runs, model.state_dim), generator=generator, dtype=torch.float64)
    with torch.no_grad():
        trajectory = rollout(model, x0, data.spinup_steps + train_steps + data.gap_steps + test_steps - 1, data.dt)
    trajectory = trajectory[data.spinup_steps:]
    train_part = cut_windows(trajectory[:train_steps], data.window, data.train_stride)
    test_part = cut_windows(trajectory[train_steps + data.gap_steps:], data.window, data.test_stride)
    order = torch.randperm(train_part.shape[0], generator=generator)[:n_fit]
    fit_windows = train_part[order]
    test = test_part[torch.randperm(test_part.shape[0], generator=generator)[: data.test_windows]]

    def observe(truth):
        return observe_windows(truth, data.every, data.edge, data.obs_error_std, generator)

    train, validation = fit_windows[: data.train_windows], fit_windows[data.train_windows:]
    return WindowData(model, train, observe(train), validation, observe(validation), test, observe(test))


# --- the learned solver ---------------------------------------------------------------------------------


def build_prior(case: LearnedSolverCase, windows: WindowData, out: Path, *, resume: bool, progress: bool):
    """The prior's tendency: loaded from ``prior.checkpoint``, or built and pretrained on training windows."""
    prior, state_dim = case.prior, windows.truth_model.state_dim
    if prior.checkpoint:
        from ..assimilation.command import load_model
        from ..errors import InputError

        try:
            loaded = load_model(prior.checkpoint, state_dim)
        except InputError as err:
            raise ConfigError(f"prior.checkpoint: {err}") from None
        return loaded.tendency, loaded.step, {}
    torch.manual_seed(case.seed)
    sample = windows.train[: max(1, prior.pretrain_windows)].transpose(0, 1)  # (steps, windows, D)
    flat = sample.reshape(-1, state_dim)
    increments = ((sample[1:] - sample[:-1]) / case.data.dt).reshape(-1, state_dim)
    tendency = Standardised(build_operator(prior.model, state_dim).double(), flat.mean(0), flat.std(0), increments.std(0))
    step = RungeKuttaStep(prior.model.scheme)
    info = {"prior_pretrain_seconds": 0.0}
    if prior.pretrain_windows > 0:
        result = fit(tendency, sample, case.data.dt, step=step, config=prior.training,
                     checkpoint_dir=out / "checkpoints" / "prior", resume=resume, progress=progress)
        info = {"prior_pretrain_seconds": result.train_seconds, "prior_pretrain_loss": result.final_loss}
    return tendency, step, info


def build_solver(case: LearnedSolverCase, tendency, step, state_dim: int) -> LearnedSolver:
    dtype = getattr(torch, case.solver.dtype)
    tendency = tendency.to(dtype)
    for parameter in tendency.parameters():
        parameter.requires_grad_(case.prior.trainable)
    prior = DynamicalPrior(tendency, case.data.dt, step)
    torch.manual_seed(case.seed)
    s = case.solver
    solver = LearnedSolver(prior, state_dim, iterations=s.iterations, hidden=s.hidden,
                           kernel=s.kernel, downsample=s.downsample, local=s.local, step=s.step,
                           prior_cost_weight=s.prior_cost_weight)
    return solver.to(dtype)


# --- the run -----------------------------------------------------------------------------------------------


def run_learned_solver(case: LearnedSolverCase, out: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Run the case into ``out``; return the metrics."""
    started = time.perf_counter()
    data = case.data
    windows = make_window_data(data)
    state_dim = windows.truth_model.state_dim
    metrics: dict = {"train_windows": int(windows.train.shape[0]), "validation_windows": int(windows.validation.shape[0]),
                     "test_windows": int(windows.test.shape[0])}

    tendency, step, info = build_prior(case, windows, out, resume=resume, progress=progress)
    metrics.update(info)
    solver = build_solver(case, tendency, step, state_dim)
    dtype = getattr(torch, case.solver.dtype)
    validation = None
    if windows.validation.shape[0] > 0:
        validation = (windows.validation_values.to(dtype), windows.validation)
    threads = torch.get_num_threads()
    result = solver.fit(windows.train_values.to(dtype), windows.train.to(dtype), config=case.training,
                        checkpoint_dir=out / "checkpoints", resume=resume, progress=progress, validation=validation)
    metrics["train_seconds"] = result.train_seconds
    metrics["final_loss"] = result.final_loss
    metrics["n_params"] = sum(p.numel() for p in solver.parameters() if p.requires_grad)
    metrics["cost_weight_obs"], metrics["cost_weight_prior"] = solver.log_weights.detach().exp().tolist()

    test, values = windows.test, windows.test_values
    estimates: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    learned, costs = solver.reconstruct(values.to(dtype), return_costs=True)
    estimates["learned"] = learned.double()
    seconds["learned"] = time.perf_counter() - clock
    metrics["learned_cost_first"] = float(costs[0].mean())
    metrics["learned_cost_last"] = float(costs[-1].mean())
    estimates["first_guess"] = interpolate_observations(values, windows.train.reshape(-1, state_dim).mean(0))

    base = case.baselines
    n_base = test.shape[0] if base.windows == 0 else min(base.windows, test.shape[0])
    truth_model = windows.truth_model
    climatology = windows.train.reshape(-1, state_dim)
    mean, covariance = climatology.mean(0), climatology.T.cov()
    background = {"background_mean": mean, "background_covariance": covariance}

    def batched(name: str, method) -> None:
        if progress:
            print(f"[{case.name}] {name} on {n_base} test windows", flush=True)
        clock = time.perf_counter()
        torch.set_num_threads(1)
        try:
            parts = [method(chunk) for chunk in values[:n_base].split(base.batch_size)]
        finally:
            torch.set_num_threads(threads)
        estimates[name] = torch.cat(parts)
        seconds[name] = time.perf_counter() - clock

    quasi_static = WindowVar4D(iterations=base.var4d_iterations, stages=base.var4d_stages)
    batched("4dvar", lambda v: quasi_static.assimilate_windows(truth_model, v, data.dt, data.obs_error_std, **background))
    if base.var4d_plain:
        plain = WindowVar4D(iterations=base.var4d_plain_iterations, stages=1)
        batched("4dvar_plain", lambda v: plain.assimilate_windows(truth_model, v, data.dt, data.obs_error_std, **background))
    enks = WindowEnKS(members=base.enks_members, inflation=base.enks_inflation, seed=case.seed)
    batched("enks", lambda v: enks.assimilate_windows(truth_model, v, data.dt, data.obs_error_std, mean=mean,
                                                      std=covariance.diagonal().sqrt()))

    interior = slice(data.edge, data.window - data.edge)
    for name, estimate in estimates.items():
        truth = test[: estimate.shape[0]]
        metrics[f"rmse_{name}"] = float((estimate - truth).pow(2).mean().sqrt())
        metrics[f"rmse_{name}_interior"] = float((estimate[:, interior] - truth[:, interior]).pow(2).mean().sqrt())
        # the RMSE of a window, its median over windows: less swayed by the few windows a method gets badly wrong
        metrics[f"median_window_rmse_{name}"] = float((estimate - truth).pow(2).mean((1, 2)).sqrt().median())
        if name in seconds:
            metrics[f"seconds_{name}"] = seconds[name]
    # the learned solver on exactly the baselines' windows, when they score fewer
    if n_base < test.shape[0]:
        metrics["rmse_learned_on_baseline_windows"] = float((estimates["learned"][:n_base] - test[:n_base]).pow(2).mean().sqrt())
    reference = metrics.get("rmse_learned_on_baseline_windows", metrics["rmse_learned"])
    metrics["ratio_learned_to_4dvar"] = reference / metrics["rmse_4dvar"]
    if "rmse_4dvar_plain" in metrics:
        metrics["ratio_learned_to_4dvar_plain"] = reference / metrics["rmse_4dvar_plain"]
    metrics["baseline_windows"] = n_base

    write_netcdf(windows_dataset(case, test, values, estimates, truth_model), out / "windows.nc")
    write_case_figures(case, out / "figures", test, values, estimates, result.history, truth_model.component_names())
    metrics["case_seconds"] = time.perf_counter() - started
    return metrics


# --- outputs -----------------------------------------------------------------------------------------------


LONG_NAMES = {
    "learned": "learned variational solver (4DVarNet) estimate",
    "4dvar": "strong-constraint 4D-Var estimate (true model, climatological background, quasi-static)",
    "4dvar_plain": "strong-constraint 4D-Var estimate (true model, climatological background, all observations at once)",
    "enks": "ensemble Kalman smoother mean (true model, climatological initial ensemble)",
    "first_guess": "linear interpolation of the observations (the solvers' first guess)",
}


# netCDF variable names (CF names start with a letter)
VARIABLES = {"learned": "learned", "4dvar": "var4d", "4dvar_plain": "var4d_plain", "enks": "enks",
             "first_guess": "first_guess"}


def windows_dataset(case: LearnedSolverCase, test, values, estimates: dict, truth_model) -> xr.Dataset:
    """The first ``save_windows`` test windows (truth, observations, estimates) and the RMSE of every estimate by step."""
    data = case.data
    keep = min(case.save_windows, test.shape[0])
    steps = np.arange(data.window)
    names = truth_model.component_names()
    dims = ("window", "step", "component")
    units = {"units": "1"}
    variables = {
        "truth": (dims, test[:keep].numpy(), {"long_name": f"true {truth_model.name} state", **units}),
        "observations": (dims, values[:keep].numpy(), {"long_name": "noisy observations (NaN where unobserved)", **units}),
    }
    for name, estimate in estimates.items():
        n = min(keep, estimate.shape[0])
        variables[VARIABLES[name]] = (
            dims, np.pad(estimate[:n].numpy(), ((0, keep - n), (0, 0), (0, 0)), constant_values=np.nan),
            {"long_name": LONG_NAMES[name], **units})
    labels = list(estimates)
    by_step = np.stack([(estimates[m] - test[: estimates[m].shape[0]]).pow(2).mean((0, 2)).sqrt().numpy() for m in labels])
    variables["rmse_by_step"] = (("estimate", "step"), by_step,
                                 {"long_name": "RMSE over the scored test windows and components at each step", **units})
    coords = {
        "window": ("window", np.arange(keep), {"long_name": "test window index", "units": "1"}),
        "step": ("step", steps, {"long_name": "model step from the window start", "units": "1"}),
        "time": ("step", steps * data.dt, {"long_name": "time from the window start", "units": "model time units"}),
        "component": ("component", names, {"long_name": "state component"}),
        "estimate": ("estimate", [VARIABLES[m] for m in labels], {"long_name": "reconstruction method (its variable)"}),
    }
    attrs = {"title": f"geonn case {case.name}: test windows", "Conventions": "CF-1.8", "source": f"geonn {__version__}",
             "case": case.name, "model": data.model, "dt": data.dt, "observation_every": data.every,
             "unobserved_edge_steps": data.edge, "obs_error_std": data.obs_error_std}
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def write_case_figures(case: LearnedSolverCase, folder: Path, test, values, estimates: dict, history: list,
                       names=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = case.data
    colors = {"learned": "tab:red", "4dvar": "tab:blue", "4dvar_plain": "tab:cyan", "enks": "tab:green",
              "first_guess": "tab:gray"}
    steps = np.arange(data.window) * data.dt
    paths = []
    fig, axes = plt.subplots(test.shape[-1], 1, figsize=(10, 2.3 * test.shape[-1]), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        ax.plot(steps, test[0, :, i].numpy(), color="k", lw=1.4, label="truth")
        ax.plot(steps, values[0, :, i].numpy(), ".", color="tab:gray", ms=5, label="observations")
        for name in ("learned", "4dvar", "enks"):
            if name in estimates:
                ax.plot(steps, estimates[name][0, :, i].numpy(), color=colors[name], lw=1, label=name)
        ax.set_ylabel(str(names[i]) if names else str(i))
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=5)
    axes[-1, 0].set_xlabel("time from the window start (model time units)")
    fig.suptitle(f"{case.name}: first test window", fontsize=10)
    paths.append(write_figure(fig, folder / "window.png"))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, estimate in estimates.items():
        error = (estimate - test[: estimate.shape[0]]).pow(2).mean((0, 2)).sqrt().numpy()
        ax.plot(steps, error, color=colors.get(name), lw=1, label=f"{name} ({float(np.sqrt((error ** 2).mean())):.3f})")
    ax.axhline(data.obs_error_std, color="k", ls=":", lw=1, label="observation error std")
    ax.set_yscale("log")
    ax.set_xlabel("time from the window start (model time units)")
    ax.set_ylabel("RMSE over test windows")
    ax.legend(fontsize=8, ncol=2)
    paths.append(write_figure(fig, folder / "rmse_by_step.png"))

    if history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["reconstruction"] for h in history], "o-", label="training reconstruction (standardised MSE)")
        if "validation_rmse" in history[0]:
            ax2 = ax.twinx()
            ax2.plot(epochs, [h["validation_rmse"] for h in history], "s--", color="tab:red", label="validation RMSE")
            ax2.set_ylabel("validation RMSE (state units)")
            ax2.legend(loc="upper center", fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.legend(loc="upper right", fontsize=8)
        paths.append(write_figure(fig, folder / "training.png"))
    return paths


def check_expected(case: LearnedSolverCase, metrics: dict) -> list[tuple[str, float, float, bool]]:
    """Rows of (metric, value, bound, met): the ``max`` targets and the learned-vs-4D-Var ratio."""
    rows = []
    for name, bound in case.expected.max.items():
        value = metrics.get(name)
        if value is not None:
            rows.append((name, float(value), float(bound), float(value) <= float(bound)))
    bound = case.expected.learned_vs_4dvar_max
    if bound is not None and "ratio_learned_to_4dvar" in metrics:
        value = float(metrics["ratio_learned_to_4dvar"])
        rows.append(("rmse_learned / rmse_4dvar", value, float(bound), value <= float(bound)))
    return rows


CONFIG = LearnedSolverCase
run = run_learned_solver