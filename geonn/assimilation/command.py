"""The ``geonn assimilate`` command: an observation file, a model and a method in; analyses and scores out.

``geonn assimilate OBS.nc --model MODEL --method METHOD --out DIR`` reads the observation file
(docs/assimilation.md), builds the forecast model (a reference model, or a learned one from a
``geonn case`` run folder), runs the method and writes, into ``DIR``:

- ``analysis.nc``: ``analysis(time, component)`` at the observation times, ``analysis_spread``
  and ``forecast`` for the ensemble methods, ``smoothed`` / ``smoothed_spread`` for the smoothers;
  CF attributes.
- ``config.toml``: the resolved settings (model, method with every hyperparameter, prior, dt).
- ``figures/*.png``: analysis against observations (and truth), and the error in time.
- ``metrics.json``, last: ``rmse_analysis`` (and ``rmse_smoothed``, ``rmse_forecast``) when
  a truth is given, and timing.

Everything is checked before any work starts, and written into a hidden folder beside ``DIR``
that is renamed to ``DIR`` at the end: a failed run leaves no ``DIR`` behind. The pieces
(:func:`make_method`, :func:`load_model`, :func:`run_method`, :func:`analysis_dataset`,
:func:`write_figures`) are shared with the ``assimilation`` case kind (:mod:`geonn.cases.assimilation`).
This module, with :mod:`geonn.assimilation.twin`, is where the assimilation code meets files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import __version__
from ..errors import ConfigError, GeonnError, InputError, describe
from ..fields import trajectory_to_dataset
from ..integrators import RungeKuttaStep, get_tableau
from ..io import check_output_folder, staged_folder, write_figure, write_json, write_netcdf, write_text
from .ensemble import ETKF, LETKF, EnKF, EnKFN
from .observations import Observations
from .scores import rmse_time_mean
from .smoothers import EnKS, IEnKS
from .twin import read_observations

METHODS = ("3dvar", "4dvar", "enkf", "etkf", "enkfn", "letkf", "enks", "ienks")
ENSEMBLE_METHODS = {"enkf": EnKF, "etkf": ETKF, "enkfn": EnKFN, "letkf": LETKF, "enks": EnKS, "ienks": IEnKS}
VARIATIONAL_METHODS = {"3dvar": ("Var3D", "ThreeDVar", "VAR3D"), "4dvar": ("Var4D", "FourDVar", "VAR4D")}
DEFAULT_MEMBERS = 20


# --- methods -----------------------------------------------------------------------------------------


def make_method(name: str, **settings):
    """Build a DA method from its command-line name and hyperparameters.

    Args:
        name: one of :data:`METHODS`.
        settings: the method's dataclass fields (``members``, ``inflation``, ``lag``, ``radius``,
            ``rotate``, ``xN``, ``iterations``, ``seed``, and for 3D-Var / 4D-Var ``scale``, ``B``,
            ``optimizer``...); ``None`` values take the defaults. ``members`` defaults to 20 for
            the ensemble methods; for 4D-Var ``lag`` is its ``window`` (observation times per
            window); 3D-Var and 4D-Var default to ``B = 'climatology'``. A setting the method does
            not have is an error that names the method's settings.

    Returns:
        The method, e.g. ``make_method("ienks", members=10, lag=2)`` is ``IEnKS(members=10, lag=2)``.
    """
    if name not in METHODS:
        raise InputError(f"method: expected one of {list(METHODS)}, got {name!r}")
    given = {k: v for k, v in settings.items() if v is not None}
    if name in ENSEMBLE_METHODS:
        cls = ENSEMBLE_METHODS[name]
        given.setdefault("members", DEFAULT_MEMBERS)
    else:
        cls = _variational_class(name)
        if name == "4dvar" and "lag" in given:
            given.setdefault("window", given.pop("lag"))
        if "background_std" not in given and "B" not in given:
            given["B"] = "climatology"
    fields = _settings_of(cls)
    unknown = sorted(set(given) - set(fields))
    if unknown:
        flags = ", ".join(repr(k) for k in unknown)
        raise InputError(
            f"method {name}: {flags} {'is not a setting' if len(unknown) == 1 else 'are not settings'} "
            f"of {cls.__name__}; its settings are {sorted(fields)}"
        )
    missing = [k for k, required in fields.items() if required and k not in given]
    if missing:
        flags = ", ".join(f"--{k}" for k in missing)
        raise InputError(f"method {name}: {cls.__name__} needs {flags} (e.g. --radius 7.3 for the LETKF on Lorenz-96)")
    try:
        return cls(**given)
    except GeonnError:
        raise
    except (TypeError, ValueError) as err:
        raise InputError(f"method {name}: {err}") from None


def _settings_of(cls) -> dict[str, bool]:
    """Setting name -> whether it is required, from a dataclass's fields."""
    if dataclasses.is_dataclass(cls):
        return {
            f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(cls) if f.init
        }
    import inspect

    parameters = inspect.signature(cls).parameters.values()
    return {p.name: p.default is inspect.Parameter.empty for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD}


def _variational_class(name: str):
    """The 3D-Var / 4D-Var class from :mod:`geonn.assimilation.variational`, imported only when asked for."""
    try:
        from . import variational
    except ModuleNotFoundError as err:
        if err.name and err.name.endswith("variational"):
            raise InputError(
                f"method {name}: needs geonn.assimilation.variational (3D-Var / 4D-Var), which this installation "
                "does not have; use an ensemble method (enkf, etkf, enkfn, letkf, enks, ienks)"
            ) from None
        raise
    for candidate in VARIATIONAL_METHODS[name]:
        cls = getattr(variational, candidate, None)
        if cls is not None:
            return cls
    raise InputError(
        f"method {name}: geonn.assimilation.variational has none of {list(VARIATIONAL_METHODS[name])}"
    )


def method_settings(method) -> dict:
    """The method's hyperparameters as a TOML-ready dict (``None`` left out)."""
    if dataclasses.is_dataclass(method):
        values = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
    else:
        values = dict(vars(method))
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}


def short_repr(method) -> str:
    """``ClassName(field=value, ...)`` with only the fields that differ from their defaults (figure titles)."""
    if not dataclasses.is_dataclass(method):
        return repr(method)
    def is_default(f, value) -> bool:
        plain = isinstance(value, (bool, int, float, str)) or value is None
        return f.default is not dataclasses.MISSING and plain and value == f.default

    changed = [f"{f.name}={getattr(method, f.name)!r}" for f in dataclasses.fields(method)
               if not is_default(f, getattr(method, f.name))]
    return f"{type(method).__name__}({', '.join(changed)})"


def is_ensemble(method) -> bool:
    return hasattr(method, "members")


# --- models ------------------------------------------------------------------------------------------


@dataclass
class Model:
    """A forecast model resolved from ``--model``: the tendency, its step, and how it was made."""

    tendency: torch.nn.Module
    step: RungeKuttaStep
    description: dict


def load_model(spec: str, state_dim: int, attrs: dict | None = None) -> Model:
    """Resolve ``--model``: ``lorenz63``, ``lorenz96``, or a ``geonn case`` run folder / its checkpoint.

    Args:
        spec: a reference model name, a run folder holding ``config.toml`` and
            ``checkpoints/checkpoint.pt``, or the path of such a checkpoint.
        state_dim: the number of state components of the observation file.
        attrs: the observation file's attributes; ``model_*`` parameters (as written by
            :func:`~geonn.assimilation.twin_experiment`) and ``scheme`` are used when ``model``
            names the same reference model.

    Raises:
        InputError: an unknown model, a missing or unsafe checkpoint, a run of another kind, or a
            state width that does not match the observations.
    """
    from ..dynamics import MODELS

    attrs = attrs or {}
    path = Path(spec)
    if spec in MODELS:  # a name wins; a run folder of that name is ./lorenz63
        return _reference_model(spec, state_dim, attrs)
    if path.exists():
        return _learned_model(path, state_dim)
    raise InputError(
        f"--model: expected {' or '.join(sorted(MODELS))}, or a geonn case run folder (or its checkpoints/checkpoint.pt), "
        f"got {spec!r}, which is neither a model name nor an existing path"
    )


def _reference_model(name: str, state_dim: int, attrs: dict) -> Model:
    from ..dynamics import MODELS

    same = str(attrs.get("model", name)) == name
    parameters = {}
    if same:
        names = ("sigma", "rho", "beta") if name == "lorenz63" else ("forcing", "n")
        for key in names:
            if f"model_{key}" in attrs:
                given = attrs[f"model_{key}"]
                try:
                    (value,) = np.asarray(given, dtype=np.float64).reshape(-1)
                except (TypeError, ValueError):
                    value = math.nan
                if not math.isfinite(value) or (key == "n" and value != int(value)):
                    text = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
                    raise InputError(f"--model {name}: the observation file's attribute model_{key} must be one "
                                     f"{'integer' if key == 'n' else 'finite number'}, got {text}")
                parameters[key] = int(value) if key == "n" else float(value)
    if name == "lorenz96":
        if parameters.get("n", state_dim) != state_dim:
            raise InputError(f"--model lorenz96: the file's model_n = {parameters['n']} does not match its {state_dim} components")
        parameters["n"] = state_dim
    try:
        model = MODELS[name](**parameters)
    except (TypeError, ValueError) as err:
        raise InputError(f"--model {name}: cannot build it with the file's parameters {parameters}: {err}") from None
    if model.state_dim != state_dim:
        raise InputError(
            f"--model {name}: the model has {model.state_dim} state components, the observation file {state_dim}"
        )
    scheme = str(attrs.get("scheme", "rk4")) if same else "rk4"
    try:
        get_tableau(scheme)
    except ValueError:
        scheme = "rk4"
    description = {"kind": "reference", "name": name, "parameters": model.parameters_dict(), "scheme": scheme}
    return Model(model.double(), RungeKuttaStep(scheme), description)


def _learned_model(path: Path, state_dim: int) -> Model:
    from ..cases.config import build, read_toml
    from ..cases.identification import IdentificationCase, build_operator
    from ..dynamics import MODELS
    from ..io import load_checkpoint
    from ..operators import Standardised

    if path.is_dir():
        folder, checkpoint = path, path / "checkpoints" / "checkpoint.pt"
        if not checkpoint.is_file():
            raise InputError(f"--model {str(path)!r}: a run folder must hold checkpoints/checkpoint.pt (from geonn case); none there")
    else:
        checkpoint = path
        folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    config_path = folder / "config.toml"
    if not config_path.is_file():
        raise InputError(f"--model {str(path)!r}: expected the run's config.toml in {str(folder)!r}, found none")
    try:
        data = read_toml(config_path)
        if data.get("kind", "identification") != "identification":
            raise InputError(f"--model {str(path)!r}: a run of kind {data.get('kind')!r} holds no learned model")
        case = build(IdentificationCase, data)
    except ConfigError as err:
        raise InputError(f"--model {str(path)!r}: its config.toml does not load: {err}") from None
    state = load_checkpoint(checkpoint)
    for key in ("model", "step"):
        if not isinstance(state.get(key), dict):
            raise InputError(f"--model {str(checkpoint)!r}: not a geonn training checkpoint (no {key!r} state)")
    reference = MODELS[case.data.model](**case.data.model_parameters)
    if reference.state_dim != state_dim:
        raise InputError(
            f"--model {str(path)!r}: learned on {case.data.model} with {reference.state_dim} components; "
            f"the observation file has {state_dim}"
        )
    zeros = torch.zeros(state_dim, dtype=torch.float64)
    model = Standardised(build_operator(case.model, state_dim).double(), zeros, zeros + 1, zeros + 1)
    step = RungeKuttaStep(case.model.scheme, learnable=case.model.learnable_scheme, learn_dt=case.model.learn_dt)
    try:
        model.load_state_dict(state["model"])
        step.load_state_dict(state["step"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise InputError(f"--model {str(checkpoint)!r}: the weights do not fit the operator of its config.toml ({first})") from None
    model.eval()
    for parameter in [*model.parameters(), *step.parameters()]:
        parameter.requires_grad_(False)
    description = {
        "kind": "learned", "name": f"learned {case.model.operator} ({case.name})", "run": str(folder.resolve()),
        "checkpoint": str(checkpoint.resolve()), "epoch": int(state.get("epoch", 0)), "scheme": step.tableau.name,
        "trained_on": case.data.model, "trained_dt": case.data.dt,
    }
    return Model(model, step, description)


# --- running -------------------------------------------------------------------------------------------


def run_method(method, model: Model, observations: Observations, dt: float, *, prior_mean, prior_spread, t0: float = 0.0):
    """Run ``method`` on ``observations``; returns its result (a FilterResult, SmootherResult or the
    variational method's), with the wall and CPU seconds as ``(result, seconds, cpu_seconds)``."""
    kwargs = {"prior_mean": prior_mean, "prior_spread": prior_spread, "t0": t0, "scheme": model.step}
    if not is_ensemble(method):
        import inspect

        accepted = inspect.signature(method.assimilate).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    started, cpu = time.perf_counter(), time.process_time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small LAPACK calls: one thread is far faster (docs/assimilation.md)
    try:
        result = method.assimilate(model.tendency, observations, dt, **kwargs)
    finally:
        torch.set_num_threads(threads)
    return result, time.perf_counter() - started, time.process_time() - cpu


def estimates(result) -> dict[str, torch.Tensor]:
    """The labelled estimates a result holds: analysis, analysis_spread, forecast, smoothed, smoothed_spread."""
    names = {
        "analysis": "analysis_mean", "analysis_spread": "analysis_spread", "forecast": "forecast_mean",
        "smoothed": "smoothed_mean", "smoothed_spread": "smoothed_spread",
    }
    out = {}
    for label, attribute in names.items():
        value = getattr(result, attribute, None)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            out[label] = value.detach().double()
    if "analysis" not in out:
        raise InputError(f"method result: expected an analysis_mean (n_times, state_dim), got {describe(result)}")
    return out


VARIABLE_ATTRS = {
    "analysis": "analysis (ensemble mean after assimilating the observation at this time)",
    "analysis_spread": "ensemble standard deviation of the analysis",
    "forecast": "forecast (ensemble mean just before the analysis)",
    "smoothed": "smoothed estimate given the observations up to lag cycles later",
    "smoothed_spread": "ensemble standard deviation of the smoothed estimate",
}


def analysis_dataset(result, times, component_names, *, attrs: dict, units: str = "1") -> xr.Dataset:
    """The estimates of ``result`` as a CF-annotated Dataset over ``(time, component)``."""
    found = estimates(result)
    variable_attrs = {k: {"long_name": VARIABLE_ATTRS[k], "units": units} for k in found}
    ds = trajectory_to_dataset(found, times, component_names, variable_attrs=variable_attrs,
                               attrs={"Conventions": "CF-1.8", "source": f"geonn {__version__}", **attrs})
    n_times = ds.sizes["time"]
    if getattr(result, "iterations", None) is not None and result.iterations.shape == (n_times,):
        ds["iterations"] = ("time", result.iterations.numpy(), {"long_name": "iterations of the analysis", "units": "1"})
    if getattr(result, "inflation", None) is not None and result.inflation.shape == (n_times,):
        ds["inflation"] = ("time", result.inflation.numpy(), {"long_name": "adaptive (EnKF-N) prior inflation factor", "units": "1"})
    return ds


def scores(result, truth: torch.Tensor | None, burn_in_rows: int) -> dict:
    """``rmse_analysis`` / ``rmse_smoothed`` / ``rmse_forecast`` (time means after ``burn_in_rows``)
    and the matching time-mean ensemble spreads."""
    found = estimates(result)
    metrics = {}
    for label in ("analysis", "smoothed", "forecast"):
        if label in found and truth is not None:
            metrics[f"rmse_{label}"] = rmse_time_mean(found[label], truth, burn_in_rows)
    for label in ("analysis_spread", "smoothed_spread"):
        if label in found:
            spread = found[label][burn_in_rows:]
            metrics[f"spread_{label.split('_')[0]}"] = float(spread.pow(2).mean(1).sqrt().mean())
    return metrics


def burn_in_rows(times: torch.Tensor, burn_in: float) -> int:
    """Rows left out of the scores: observation times ``<= burn_in`` (model time units; DAPPER's ``BurnIn``)."""
    if isinstance(burn_in, bool) or not isinstance(burn_in, (int, float)) or not math.isfinite(burn_in) or burn_in < 0:
        raise InputError(f"--burn-in: expected a time >= 0 (model time units), got {describe(burn_in)}")
    rows = int((times <= burn_in + 1e-9 * max(1.0, abs(burn_in))).sum())
    if rows >= times.numel():
        raise InputError(
            f"--burn-in: {burn_in:g} leaves no observation time to score (the last is {float(times[-1]):g})"
        )
    return rows


# --- files ---------------------------------------------------------------------------------------------


def read_truth(path: str | os.PathLike, times: torch.Tensor, state_dim: int) -> torch.Tensor:
    """The true states at the observation ``times`` from a netCDF file's ``truth(time, component)``
    (as written by :func:`~geonn.assimilation.twin_experiment`) or ``state(time, component)``
    (as written by :func:`geonn.simulate`); its times must include every observation time."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--truth: expected an existing netCDF file, got {str(path)!r}")
    try:
        with xr.open_dataset(path) as ds:
            name = next((n for n in ("truth", "state") if n in ds.data_vars), None)
            if name is None:
                raise InputError(f"--truth {str(path)!r}: missing variable 'truth(time, component)' (or 'state')")
            da = ds[name]
            if set(da.dims) != {"time", "component"}:
                raise InputError(f"--truth {str(path)!r}: expected {name}(time, component), got dims {da.dims}")
            if "time" not in ds.variables or ds["time"].dtype.kind not in "fiu" or da.dtype.kind not in "fiu":
                raise InputError(f"--truth {str(path)!r}: expected numeric {name}(time, component) and numeric times "
                                 "(model time units)")
            values = np.asarray(da.transpose("time", "component").values, dtype=np.float64)
            file_times = np.asarray(ds["time"].values, dtype=np.float64)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:  # what the netCDF engines raise for a non-netCDF file
        if isinstance(err, InputError):
            raise
        raise InputError(f"--truth {str(path)!r}: not a readable netCDF file ({err})") from None
    if file_times.size == 0 or not np.isfinite(file_times).all() or (np.diff(file_times) <= 0).any():
        raise InputError(f"--truth {str(path)!r}: expected finite, strictly increasing times, got {file_times.size} times "
                         "with duplicates, a decrease, NaN or inf (or none)")
    if values.shape[1] != state_dim:
        raise InputError(f"--truth {str(path)!r}: {values.shape[1]} components, the observations have {state_dim}")
    wanted = times.numpy()
    index = np.searchsorted(file_times, wanted)
    index = np.clip(index, 0, file_times.size - 1)
    for shift in (-1, 0):  # nearest of the two neighbours
        other = np.clip(index + shift, 0, file_times.size - 1)
        closer = np.abs(file_times[other] - wanted) < np.abs(file_times[index] - wanted)
        index = np.where(closer, other, index)
    off = np.abs(file_times[index] - wanted) > 1e-9 * np.maximum(1.0, np.abs(wanted))
    if off.any():
        k = int(np.nonzero(off)[0][0])
        raise InputError(f"--truth {str(path)!r}: has no state at observation time {wanted[k]:g}")
    truth = values[index]
    if not np.isfinite(truth).all():
        raise InputError(f"--truth {str(path)!r}: NaN or inf at the observation times")
    return torch.as_tensor(truth)


def write_figures(folder: Path, times, found: dict, observations, truth, names, title: str,
                  error_std: float | None = None, last: int = 200, suffix: str = "") -> list[Path]:
    """``analysis{suffix}.png`` (the first three components over the last ``last`` observation
    times: truth, observations, analysis with its spread, smoothed) and, with a truth,
    ``error{suffix}.png`` (the RMSE over components in time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = np.asarray(times)
    window = slice(max(0, times.size - last), times.size)
    n = min(3, len(names))
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.3 * n), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        t = times[window]
        if truth is not None:
            ax.plot(t, truth[window, i], color="k", lw=1.2, label="truth")
        ax.plot(t, observations[window, i], ".", color="tab:gray", ms=3, label="observations")
        analysis = found["analysis"][window, i].numpy()
        ax.plot(t, analysis, color="tab:red", lw=1, label="analysis")
        if "analysis_spread" in found:
            spread = found["analysis_spread"][window, i].numpy()
            ax.fill_between(t, analysis - spread, analysis + spread, color="tab:red", alpha=0.2, lw=0)
        if "smoothed" in found:
            ax.plot(t, found["smoothed"][window, i].numpy(), color="tab:blue", lw=1, ls="--", label="smoothed")
        ax.set_ylabel(str(names[i]))
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=4)
    axes[-1, 0].set_xlabel("time (model time units)")
    fig.suptitle(title, fontsize=10)
    paths = [write_figure(fig, folder / f"analysis{suffix}.png")]
    if truth is not None:
        fig, ax = plt.subplots(figsize=(10, 3))
        for label, color in (("forecast", "tab:gray"), ("analysis", "tab:red"), ("smoothed", "tab:blue")):
            if label in found:
                error = (found[label] - truth).pow(2).mean(1).sqrt().numpy()
                ax.plot(times, error, color=color, lw=0.8, label=label)
        if error_std is not None:
            ax.axhline(error_std, color="k", ls=":", lw=1, label="observation error std")
        ax.set_yscale("log")
        ax.set_xlabel("time (model time units)")
        ax.set_ylabel("RMSE over components")
        ax.legend(loc="upper right", fontsize=8, ncol=4)
        ax.set_title(title, fontsize=10)
        paths.append(write_figure(fig, folder / f"error{suffix}.png"))
    return paths


def _prior(ds: xr.Dataset, observations: Observations) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The initial ensemble's mean and spread: the file's ``initial_truth`` (a twin experiment)
    with the mean observation error std, else the observations' climatology."""
    values = observations.values
    std = float(observations.error.std.mean())
    if "initial_truth" in ds.data_vars and ds["initial_truth"].dims == ("component",):
        mean = torch.as_tensor(np.asarray(ds["initial_truth"].values, dtype=np.float64))
        if mean.numel() == values.shape[1] and bool(torch.isfinite(mean).all()):
            spread = torch.full_like(mean, std)
            return mean, spread, {"mean": "initial_truth (the file's truth at time 0)", "spread": std}
    observed = ~torch.isnan(values)
    overall = values[observed]
    counts = observed.sum(0)
    mean = torch.where(counts > 0, torch.nan_to_num(values).sum(0) / counts.clamp(min=1), overall.mean())
    spread_all = float(overall.std()) if overall.numel() > 1 else std
    squares = torch.nan_to_num((values - mean) ** 2).sum(0)
    spread = torch.where(counts > 1, (squares / (counts - 1).clamp(min=1)).sqrt(), torch.full_like(mean, spread_all))
    spread = torch.where(spread > 0, spread, torch.full_like(spread, max(spread_all, std)))
    return mean, spread, {"mean": "observation climatology (time mean per component)", "spread": "observation std per component"}


# --- the command ----------------------------------------------------------------------------------------


@dataclass
class AssimilateSettings:
    """The arguments of ``geonn assimilate``."""

    observations: str
    model: str
    method: str
    out: str
    members: int | None = None
    inflation: float | None = None
    lag: int | None = None
    radius: float | None = None
    dt: float | None = None
    truth: str | None = None
    burn_in: float = 0.0
    seed: int | None = None
    background_scale: float | None = None
    overwrite: bool = False


def assimilate(settings: AssimilateSettings) -> dict:
    """Run ``geonn assimilate``: check everything, run, write ``DIR`` whole or not at all; returns the metrics."""
    obs_path = Path(settings.observations)
    observations = read_observations(obs_path)
    with _open(obs_path) as ds:
        attrs = dict(ds.attrs)
        component_names = [str(c) for c in ds["component"].values] if "component" in ds.coords else None
        units = str(ds["observations"].attrs.get("units", "1"))
        prior_mean, prior_spread, prior_description = _prior(ds, observations)
    if observations.operator is None:
        raise InputError(
            f"{str(obs_path)!r}: observations(time, obs) need their observation operator, which a file cannot carry; "
            "the command assimilates observations(time, component)"
        )
    state_dim = observations.obs_dim
    component_names = component_names or [f"x{i}" for i in range(state_dim)]
    dt = settings.dt if settings.dt is not None else observations.dt
    if dt is None:
        raise InputError(f"--dt: {str(obs_path)!r} has no 'dt' attribute; give the model step with --dt")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise InputError(f"--dt: expected a positive model step, got {dt!r}")
    t0 = min(0.0, float(observations.times[0]))
    observations.steps(dt, t0)  # observation times on the model grid, or an error naming the first that is not
    method = make_method(settings.method, members=settings.members, inflation=settings.inflation, lag=settings.lag,
                         radius=settings.radius, seed=settings.seed, scale=settings.background_scale)
    model = load_model(settings.model, state_dim, attrs)
    truth = read_truth(settings.truth, observations.times, state_dim) if settings.truth else None
    skip = burn_in_rows(observations.times, settings.burn_in)
    out = Path(settings.out)
    check_output_folder(out, settings.overwrite)

    resolved = {
        "geonn": __version__,
        "observations": str(obs_path.resolve()),
        "dt": float(dt),
        "t0": t0,
        "burn_in": float(settings.burn_in),
        "burn_in_rows": skip,
        "model": {"spec": settings.model, **model.description},
        "method": {"name": settings.method, "description": repr(method), **method_settings(method)},
    }
    if truth is not None:
        resolved["truth"] = str(Path(settings.truth).resolve())
    resolved["prior"] = prior_description

    with staged_folder(out, settings.overwrite) as stage:
        result, seconds, cpu_seconds = run_method(method, model, observations, dt, prior_mean=prior_mean,
                                                  prior_spread=prior_spread, t0=t0)
        ds = analysis_dataset(result, observations.times, component_names, units=units, attrs={
            "title": f"geonn assimilate: {settings.method} on {obs_path.name}",
            "history": f"geonn assimilate {obs_path.name} --model {settings.model} --method {settings.method}",
            "method": repr(method), "model": model.description["name"], "observation_file": str(obs_path.resolve()),
            "dt": float(dt),
        })
        write_netcdf(ds, stage / "analysis.nc")
        import tomli_w

        write_text(stage / "config.toml", tomli_w.dumps(_without_none(resolved)))
        found = estimates(result)
        write_figures(stage / "figures", observations.times.numpy(), found, observations.values.numpy(),
                      None if truth is None else truth, component_names,
                      f"{method!r} with {model.description['name']}", float(observations.error.std.mean()))
        metrics = {"method": settings.method, "cycles": len(observations), "seconds": seconds, "cpu_seconds": cpu_seconds,
                   **scores(result, truth, skip)}
        write_json(metrics, stage / "metrics.json")
    return metrics


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


@contextlib.contextmanager
def _open(path: Path):
    try:
        with xr.open_dataset(path) as ds:
            yield ds.load()
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{str(path)!r}: not a readable netCDF file ({err})") from None
