"""Assimilation cases: several DA methods on one twin experiment, scored against the truth.

A case file of kind ``"assimilation"`` names the reference model and the observing system
(``[twin]``), lists the methods with their tunings (``[[methods]]``) and records the published
scores beside the targets (``[expected]``), as DAPPER's ``mods/*/`` files do. The runner simulates
the truth once, observes it every ``every`` steps (a method may observe at another interval: its
own twin of the same truth), runs each method from the same prior, and writes
``observations[-every<k>].nc``, ``analysis-<label>.nc``, ``figures/analysis-<label>.png`` and
``figures/error-<label>.png``; ``metrics.json`` (written last by :func:`geonn.cases.run_case`)
holds flat keys ``rmse_analysis_<label>``, ``rmse_smoothed_<label>``, ``cpu_seconds_<label>``...

The forecast model is the twin's true model unless ``[model]`` names a learned one: an
identification case to train into ``out/model`` first (``train_case``, with ``overrides`` as
``--set``), or an existing run folder or checkpoint (``checkpoint``), loaded by
:func:`geonn.assimilation.command.load_model` as ``geonn assimilate --model RUN`` does. With
``compare_true`` every method also runs with the true equations on the same observations, and
its metrics carry the suffix ``_true_model`` (``rmse_analysis_etkf`` beside
``rmse_analysis_etkf_true_model``); ``max_ratio_to_true`` in ``[expected]`` bounds each
method's ``rmse_analysis`` over its true-model figure.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..assimilation.command import (
    METHODS,
    Model,
    analysis_dataset,
    estimates,
    load_model,
    make_method,
    run_method,
    scores,
    short_repr,
    write_figures,
)
from ..assimilation.observations import ObservationError, Subset
from ..assimilation.twin import read_observations, twin_experiment
from ..dynamics import MODELS
from ..errors import ConfigError, InputError
from ..integrators import RungeKuttaStep
from ..io import write_netcdf


@dataclass
class TwinConfig:
    """The truth and how it is observed (model time units; the observation error in state units).

    ``cycles`` observation times at each interval; ``burn_in`` leaves the times ``<= burn_in`` out
    of the scores (DAPPER's ``BurnIn``), at most half of them (so a reduced run still scores).
    The prior is ``N(truth at t0, prior_spread^2 I)``, ``prior_spread`` defaulting to ``obs_error_std``.
    """

    model: str = "lorenz63"
    model_parameters: dict = field(default_factory=dict)
    dt: float = 0.01
    every: int = 25
    cycles: int = 1000
    obs_error_std: float = 1.0
    observed: list[int] = field(default_factory=list)
    spinup_steps: int = 0
    seed: int = 0
    prior_spread: float | None = None
    burn_in: float = 0.0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError(f"twin.model: expected one of {sorted(MODELS)}, got {self.model!r}")
        if not self.dt > 0:
            raise ConfigError(f"twin.dt: expected a positive step, got {self.dt}")
        for name in ("every", "cycles"):
            if getattr(self, name) < 1:
                raise ConfigError(f"twin.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if not (self.obs_error_std > 0 and math.isfinite(self.obs_error_std)):
            raise ConfigError(f"twin.obs_error_std: expected a positive standard deviation, got {self.obs_error_std}")
        if self.prior_spread is not None and not self.prior_spread > 0:
            raise ConfigError(f"twin.prior_spread: expected a positive standard deviation, got {self.prior_spread}")
        if self.spinup_steps < 0 or self.seed < 0 or not self.burn_in >= 0:
            raise ConfigError("twin.spinup_steps, twin.seed, twin.burn_in: expected values >= 0")


@dataclass
class MethodConfig:
    """One method of the case: its name, its tuning, and the label of its metrics.

    Unset fields take the method's defaults; ``options`` holds any other setting of the method's
    dataclass (e.g. ``{ optimizer = "gauss-newton" }`` for 4D-Var).
    """

    method: str
    label: str = ""
    every: int | None = None
    members: int | None = None
    inflation: float | None = None
    lag: int | None = None
    radius: float | None = None
    rotate: bool | None = None
    xN: float | None = None
    iterations: int | None = None
    scale: float | None = None
    seed: int | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"methods.method: expected one of {list(METHODS)}, got {self.method!r}")
        self.label = self.label or self.method
        if not self.label.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"methods.label: expected letters, digits, '-' or '_', got {self.label!r}")
        if self.every is not None and self.every < 1:
            raise ConfigError(f"methods.every: expected an integer >= 1, got {self.every}")

    def settings(self) -> dict:
        names = ("members", "inflation", "lag", "radius", "rotate", "xN", "iterations", "scale", "seed")
        return {**{name: getattr(self, name) for name in names}, **self.options}


@dataclass
class ForecastModelConfig:
    """The forecast model: the twin's true equations (the default), or a learned tendency.

    ``train_case``: an identification case (name or path) trained into ``out/model`` before the
    methods run (``overrides``: its ``--set`` overrides, e.g. a reduced training for tests; a
    resumed run reuses a finished ``out/model``). ``checkpoint``: instead, an existing
    ``geonn case`` run folder or its ``checkpoints/checkpoint.pt``. ``compare_true``: also run
    every method with the true equations (metrics suffixed ``_true_model``).
    """

    train_case: str = ""
    overrides: list[str] = field(default_factory=list)
    checkpoint: str = ""
    compare_true: bool = True

    def __post_init__(self):
        if self.train_case and self.checkpoint:
            raise ConfigError("model.train_case, model.checkpoint: expected one of them, got both")
        if self.overrides and not self.train_case:
            raise ConfigError("model.overrides: only with model.train_case")

    @property
    def learned(self) -> bool:
        return bool(self.train_case or self.checkpoint)


@dataclass
class AssimilationExpected:
    """Published scores (``reference``, with their source), targets (``max``: metric <= bound) and,
    for a learned forecast model, ``max_ratio_to_true``: every method's ``rmse_analysis`` at most
    this multiple of its true-model figure."""

    source: str = ""
    reference: dict = field(default_factory=dict)
    max: dict = field(default_factory=dict)
    max_ratio_to_true: float | None = None


@dataclass
class AssimilationCase:
    """A whole assimilation case (one TOML file in ``cases/``)."""

    name: str
    kind: str = "assimilation"
    description: str = ""
    twin: TwinConfig = field(default_factory=TwinConfig)
    model: ForecastModelConfig = field(default_factory=ForecastModelConfig)
    methods: list[MethodConfig] = field(default_factory=list)
    expected: AssimilationExpected = field(default_factory=AssimilationExpected)

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("methods: expected at least one [[methods]] entry")
        labels = [m.label for m in self.methods]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ConfigError(f"methods.label: labels must be unique (they name the metrics), got {repeated} more than once")
        for method in self.methods:  # every tuning is checked when the case loads, not after an hour of running
            try:
                make_method(method.method, **method.settings())
            except ConfigError:
                raise
            except ValueError as err:
                raise ConfigError(f"methods[{method.label}]: {err}") from None


def run_assimilation(case: AssimilationCase, out: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Run every method of ``case`` on its twin experiment; write the outputs into ``out``; return the metrics."""
    started = time.perf_counter()
    twin = case.twin
    model = MODELS[twin.model](**twin.model_parameters).double()
    observed = list(twin.observed) or list(range(model.state_dim))
    try:
        operator = Subset(observed, model.state_dim)
    except ValueError as err:
        raise ConfigError(f"twin.observed: {err}") from None
    error = ObservationError(std=twin.obs_error_std)
    intervals = sorted({m.every or twin.every for m in case.methods})
    true_model = Model(model, RungeKuttaStep("rk4"), {"kind": "reference", "name": twin.model})
    metrics: dict = {}
    forecast_models = [("", true_model)]
    if case.model.learned:
        learned = _learned_model(case, out, model.state_dim, resume=resume, progress=progress)
        forecast_models = [("", learned)] + ([("_true_model", true_model)] if case.model.compare_true else [])
    twins = {}
    for every in intervals:
        ds = twin_experiment(model, twin.dt, every * twin.cycles, operator, error, every=every,
                             spinup_steps=twin.spinup_steps, seed=twin.seed)
        ds.attrs["case"] = case.name
        name = "observations.nc" if len(intervals) == 1 else f"observations-every{every}.nc"
        write_netcdf(ds, out / name)
        observations = read_observations(ds)
        truth = torch.as_tensor(ds.truth.values)
        # a reduced run (--set twin.cycles=...) scores at least its second half
        skip = int((observations.times <= twin.burn_in + 1e-9).sum())
        skip = min(skip, len(observations) // 2)
        metrics[f"burn_in_cycles_every{every}"] = skip
        twins[every] = (ds, observations, truth, skip)
    names = model.component_names()
    for suffix, forecast_model in forecast_models:
        for config in case.methods:
            _run_method(case, config, forecast_model, twins, names, out, metrics, suffix, progress)
    metrics["cycles"] = twin.cycles
    metrics["case_seconds"] = time.perf_counter() - started
    return metrics


def _learned_model(case: AssimilationCase, out: Path, state_dim: int, *, resume: bool, progress: bool) -> Model:
    """The learned forecast model: ``model.checkpoint`` loaded, or ``model.train_case`` trained into ``out/model``."""
    from . import load_case, run_case

    spec = case.model.checkpoint
    if case.model.train_case:
        folder = out / "model"
        finished = resume and (folder / "metrics.json").is_file() and (folder / "checkpoints" / "checkpoint.pt").is_file()
        if not finished:
            trained = load_case(case.model.train_case, list(case.model.overrides))
            if trained.kind != "identification":
                raise ConfigError(f"model.train_case: expected an identification case, got kind {trained.kind!r}")
            if progress:
                print(f"[{case.name}] training the forecast model: case {trained.name} into {folder}", flush=True)
            run_case(trained, folder, overwrite=not resume, resume=resume, progress=progress)
        spec = str(folder)
    try:
        return load_model(spec, state_dim)
    except InputError as err:
        raise ConfigError(f"model: {err}") from None


def _run_method(case: AssimilationCase, config: MethodConfig, forecast_model: Model, twins: dict, names, out: Path,
                metrics: dict, suffix: str, progress: bool) -> None:
    """Run one method with one forecast model; write its outputs and add its metrics (labels + ``suffix``)."""
    twin = case.twin
    every = config.every or twin.every
    ds, observations, truth, skip = twins[every]
    method = make_method(config.method, **config.settings())
    prior_mean = torch.as_tensor(ds.initial_truth.values)
    spread = twin.prior_spread if twin.prior_spread is not None else twin.obs_error_std
    label = config.label + suffix
    model_name = forecast_model.description["name"]
    if progress:
        print(f"[{case.name}] {label}: {method!r} with {model_name}, {len(observations)} cycles every {every} steps",
              flush=True)
    result, seconds, cpu_seconds = run_method(method, forecast_model, observations, twin.dt, prior_mean=prior_mean,
                                              prior_spread=spread)
    attrs = {"title": f"geonn case {case.name}: {label}", "case": case.name, "method": repr(method),
             "model": model_name, "dt": twin.dt, "observation_every": every}
    write_netcdf(analysis_dataset(result, observations.times, names, attrs=attrs), out / f"analysis-{label}.nc")
    write_figures(out / "figures", observations.times.numpy(), estimates(result), observations.values.numpy(), truth,
                  names, f"{case.name}: {short_repr(method)} ({model_name})", twin.obs_error_std, suffix=f"-{label}")
    for key, value in scores(result, truth, skip).items():
        metrics[f"{key}_{label}"] = value
    metrics[f"seconds_{label}"] = seconds
    metrics[f"cpu_seconds_{label}"] = cpu_seconds
    if progress:
        found = {k: v for k, v in metrics.items() if k.endswith(f"_{label}") and k.startswith("rmse")}
        print("    " + ", ".join(f"{k} = {v:.3f}" for k, v in found.items()) + f" ({cpu_seconds:.0f} CPU s)", flush=True)


def check_expected(case: AssimilationCase, metrics: dict) -> list[tuple[str, float, float, bool]]:
    """Rows of (metric, value, bound, met) for the case's targets that the metrics hold, and with
    ``max_ratio_to_true`` each method's ``rmse_analysis`` over its true-model figure."""
    rows = []
    for name, bound in case.expected.max.items():
        value = metrics.get(name)
        if value is not None:
            rows.append((name, float(value), float(bound), float(value) <= float(bound)))
    bound = case.expected.max_ratio_to_true
    if bound is not None:
        for method in case.methods:
            learned, true = (metrics.get(f"rmse_analysis_{method.label}{s}") for s in ("", "_true_model"))
            if learned is not None and true:
                ratio = float(learned) / float(true)
                rows.append((f"rmse_analysis_{method.label} / rmse_analysis_{method.label}_true_model", ratio, float(bound),
                             ratio <= float(bound)))
    return rows


CONFIG = AssimilationCase
run = run_assimilation
