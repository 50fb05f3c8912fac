"""Twin experiments, and the observation file format (read and written here, xarray at the edge).

The observation file (docs/assimilation.md) is a netCDF dataset with

- ``observations(time, component)``: NaN where a component is not observed at that time; only
  observation times are rows. Observations of an operator that is not a subset of components
  are stored as ``observations(time, obs)`` instead.
- ``time``: model time units, strictly increasing.
- the observation error standard deviation: a scalar attribute ``obs_error_std``, or a variable
  ``obs_error_std(component)`` (or ``obs_error_std(obs)``).
- optional attributes ``model`` (name) and ``dt`` (model step).

This module and :mod:`geonn.fields` are the only places of geonn that handle labelled data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .. import __version__
from ..errors import InputError, InputTypeError, describe
from ..fields import trajectory_to_dataset
from ..integrators import RungeKuttaStep, rollout
from .observations import ObservationError, ObservationOperator, Observations, Schedule, Subset


def twin_experiment(
    model,
    dt: float,
    n_steps: int,
    operator: ObservationOperator,
    error: ObservationError,
    every: int | Schedule = 1,
    *,
    spinup_steps: int = 0,
    seed: int = 0,
    scheme: str = "rk4",
    x0: torch.Tensor | None = None,
) -> xr.Dataset:
    """Simulate a true trajectory and observe it with noise: the data of an identical-twin experiment.

    Args:
        model: the true tendency ``f(t, x)``; a :mod:`geonn.dynamics` model, or any tendency when
            ``x0`` is given.
        dt: model step (model time units).
        n_steps: steps after spin-up; observations fall on steps ``1 .. n_steps`` (and 0 if scheduled).
        operator: observation operator ``H`` (a :class:`Subset` gives ``observations(time, component)``,
            any other ``observations(time, obs)``).
        error: observation error ``N(0, R)`` with a diagonal ``R`` (the file holds standard deviations).
        every: observe every ``every`` steps, or a :class:`Schedule` (irregular steps, gaps).
        spinup_steps: steps integrated and discarded first (time 0 is after spin-up).
        seed: seed of the observation noise.
        scheme: Runge-Kutta scheme of the truth.
        x0: initial true state ``(state_dim,)`` before spin-up (default: the model's own).

    Returns:
        A Dataset in the observation file format with also ``truth(time, component)`` (the truth at
        the observation times) and ``initial_truth(component)`` (the truth at time 0).

    Example:
        >>> import geonn
        >>> from geonn.assimilation import ObservationError, Subset, twin_experiment
        >>> ds = twin_experiment(geonn.Lorenz63(), 0.01, 250, Subset([0, 1, 2], 3), ObservationError(std=2 ** 0.5), every=25)
        >>> ds.observations.dims, ds.sizes["time"]
        (('time', 'component'), 10)
    """
    if not callable(model):
        raise InputTypeError(f"model: expected a tendency f(t, x), got {describe(model)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or not 1 <= n_steps < 2**31:
        raise InputError(f"n_steps: expected an integer in [1, 2**31), got {describe(n_steps)}")
    if isinstance(spinup_steps, bool) or not isinstance(spinup_steps, int) or spinup_steps < 0:
        raise InputError(f"spinup_steps: expected an integer >= 0, got {describe(spinup_steps)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"seed: expected an integer in [0, 2**63), got {describe(seed)}")
    if not isinstance(operator, ObservationOperator):
        raise InputTypeError(f"operator: expected an ObservationOperator (Subset, Linear, Function), got {describe(operator)}")
    if not isinstance(error, ObservationError):
        raise InputTypeError(f"error: expected an ObservationError, got {describe(error)}")
    if not error.is_diagonal:
        raise InputError("error: the observation file holds standard deviations; expected a diagonal R, got a full covariance")
    if error.dim is not None and error.dim != operator.obs_dim:
        raise InputError(f"error: expected an error over obs_dim={operator.obs_dim} observations, got dim {error.dim}")
    if not isinstance(every, Schedule) and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise InputError(f"every: expected an integer >= 1 (observe every `every` steps) or a Schedule, got {describe(every)}")
    schedule = every if isinstance(every, Schedule) else Schedule.every(every, n_steps)
    if isinstance(every, Schedule) and every.steps[-1] > n_steps:
        raise InputError(f"every: expected observation steps <= n_steps={n_steps}, got last step {every.steps[-1]}")

    if x0 is None:
        if not hasattr(model, "default_initial_state"):
            raise InputError(f"x0: expected an initial state for {describe(model)}, which has no default_initial_state")
        x0 = model.default_initial_state(torch.float64)
    if isinstance(x0, torch.Tensor) and (x0.is_complex() or x0.dtype == torch.bool):
        raise InputError(f"x0: expected one real state (state_dim,), got {describe(x0)}")
    try:
        x0 = torch.as_tensor(x0, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"x0: expected one state (state_dim,), got {describe(x0)}") from None
    if x0.dim() != 1:
        raise InputError(f"x0: expected one state (state_dim,), got shape {tuple(x0.shape)}")
    if operator.state_dim is not None and operator.state_dim != x0.numel():
        raise InputError(
            f"operator: expected an operator of states with {x0.numel()} components (those of the model), got "
            f"{operator!r} of state_dim={operator.state_dim}"
        )
    step = RungeKuttaStep(scheme)
    with torch.no_grad():
        if spinup_steps:
            x0 = rollout(model, x0, spinup_steps, dt, step)[-1]
        truth = rollout(model, x0, n_steps, dt, step)
        steps = list(schedule.steps)
        truth_at_obs = truth[steps]
        clean = operator(truth_at_obs)
        generator = torch.Generator().manual_seed(seed)
        noisy = clean + error.sample(tuple(clean.shape), generator)
    times = dt * torch.tensor(steps, dtype=torch.float64)
    state_dim = x0.numel()
    names = model.component_names() if hasattr(model, "component_names") else [f"x{i}" for i in range(state_dim)]
    name = str(getattr(model, "name", None) or getattr(model, "__name__", type(model).__name__))
    params = {f"model_{k}": v for k, v in model.parameters_dict().items()} if hasattr(model, "parameters_dict") else {}
    attrs = {
        "title": f"{name} twin experiment",
        "Conventions": "CF-1.8",
        "source": f"geonn {__version__}",
        "model": name,
        **params,
        "dt": float(dt),
        "scheme": step.tableau.name,
        "spinup_steps": spinup_steps,
        "seed": seed,
        "observation_operator": repr(operator),
    }
    var_attrs = {
        "truth": {"long_name": "true state at the observation times", "units": "1"},
        "observations": {"long_name": "observations (NaN: not observed)", "units": "1"},
    }
    std = error.std.double()
    subset = operator.indices is not None and operator.state_dim == state_dim
    if subset:
        full = torch.full((len(steps), state_dim), math.nan, dtype=torch.float64)
        full[:, list(operator.indices)] = noisy
        trajectories = {"truth": truth_at_obs, "observations": full}
        ds = trajectory_to_dataset(trajectories, times, names, variable_attrs=var_attrs, attrs=attrs)
        obs_dim_name = "component"
    else:
        ds = trajectory_to_dataset({"truth": truth_at_obs}, times, names, variable_attrs=var_attrs, attrs=attrs)
        ds = ds.assign_coords(obs=("obs", np.arange(operator.obs_dim), {"long_name": "observation index"}))
        ds["observations"] = (("time", "obs"), noisy.numpy(), var_attrs["observations"])
        obs_dim_name = "obs"
    ds["initial_truth"] = (("component",), truth[0].numpy(), {"long_name": "true state at time 0", "units": "1"})
    if std.dim() == 0 or bool((std == std[0]).all()):
        ds.attrs["obs_error_std"] = float(std.reshape(-1)[0])
    else:
        values = std.numpy()
        if subset:
            values = np.full(state_dim, np.nan)
            values[list(operator.indices)] = std.numpy()
        ds["obs_error_std"] = ((obs_dim_name,), values, {"long_name": "observation error standard deviation", "units": "1"})
    return ds


def read_observations(source: str | os.PathLike | xr.Dataset, operator: ObservationOperator | None = None) -> Observations:
    """Read and check an observation file (or Dataset) into tensors.

    Args:
        source: a netCDF path or an ``xarray.Dataset`` in the observation file format.
        operator: the observation operator. Default for ``observations(time, component)``: every
            component (``Subset.all``), NaN marking what is missing; ``observations(time, obs)``
            needs the operator that made them (without one the result's ``operator`` is None).

    Returns:
        :class:`~geonn.assimilation.Observations` with ``times (n_times,)``, ``values
        (n_times, obs_dim)`` (float64, NaN = missing), the error, the operator, ``model`` and ``dt``.

    Raises:
        InputError: naming the problem: a missing ``observations`` variable or ``time``, other
            dimensions, a missing or non-positive ``obs_error_std``, a row with no observation,
            non-increasing times.
    """
    if operator is not None and not isinstance(operator, ObservationOperator):
        raise InputTypeError(f"operator: expected an ObservationOperator (Subset, Linear, Function) or None, got {describe(operator)}")
    if isinstance(source, xr.Dataset):
        return _from_dataset(source, operator, "dataset")
    if not isinstance(source, (str, os.PathLike)):
        raise InputTypeError(f"source: expected a netCDF path or an xarray.Dataset, got {describe(source)}")
    path = Path(source)
    if not path.is_file():
        raise InputError(f"source: expected an existing observation file, got {str(path)!r}")
    try:
        with xr.open_dataset(path) as ds:
            ds.load()
            return _from_dataset(ds, operator, repr(str(path)))
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"source {str(path)!r}: not a readable netCDF file ({err})") from None


def _from_dataset(ds: xr.Dataset, operator, where: str) -> Observations:
    if "observations" not in ds.data_vars:
        raise InputError(f"observation file {where}: missing variable 'observations' (expected observations(time, component))")
    da = ds["observations"]
    dims = set(da.dims)
    if dims not in ({"time", "component"}, {"time", "obs"}):
        raise InputError(f"observation file {where}: expected observations(time, component) or (time, obs), got dims {da.dims}")
    obs_dim_name = "component" if "component" in dims else "obs"
    da = da.transpose("time", obs_dim_name)
    if da.dtype.kind not in "fiu":
        raise InputError(f"observation file {where}: expected numeric 'observations' (NaN for missing), got dtype {da.dtype}")
    if "time" not in ds.variables:
        raise InputError(f"observation file {where}: missing the 'time' coordinate (model time units)")
    time = ds["time"].values
    if not np.issubdtype(time.dtype, np.number):
        raise InputError(f"observation file {where}: expected 'time' as numbers in model time units, got dtype {time.dtype}")
    time = np.array(time, dtype=np.float64)
    if not np.isfinite(time).all():
        raise InputError(f"observation file {where}: 'time' has NaN or inf entries")
    steps = np.diff(time)
    if (steps <= 0).any():
        k = int(np.nonzero(steps <= 0)[0][0])
        raise InputError(
            f"observation file {where}: 'time' must be strictly increasing, got time[{k}] = {time[k]:g} "
            f"then time[{k + 1}] = {time[k + 1]:g}"
        )
    values = np.array(da.values, dtype=np.float64)  # a writable copy
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise InputError(
            f"observation file {where}: expected at least one observation time and one {obs_dim_name}, got "
            f"observations of shape {values.shape}"
        )
    if np.isinf(values).any():
        raise InputError(f"observation file {where}: 'observations' has inf entries (use NaN for missing)")
    empty = np.isnan(values).all(axis=1)
    if empty.any():
        k = int(np.nonzero(empty)[0][0])
        raise InputError(f"observation file {where}: row {k} (time {time[k]:g}) has no observation (all NaN); drop the row")
    error = _read_error(ds, values, obs_dim_name, where)
    if operator is None and obs_dim_name == "component":
        operator = Subset.all(values.shape[1])
    model = ds.attrs.get("model")
    dt = ds.attrs.get("dt")
    if dt is not None:
        dt = _positive_number(dt)
        if dt is None:
            raise InputError(f"observation file {where}: attribute 'dt' must be one positive step, got {_short(ds.attrs['dt'])}")
    return Observations(
        times=torch.as_tensor(time),
        values=torch.as_tensor(values),
        error=error,
        operator=operator,
        model=None if model is None else str(model),
        dt=dt,
    )


def _read_error(ds: xr.Dataset, values: np.ndarray, obs_dim_name: str, where: str) -> ObservationError:
    in_attrs = "obs_error_std" in ds.attrs
    in_vars = "obs_error_std" in ds.variables
    if in_attrs == in_vars:
        state = "both an attribute and a variable" if in_attrs else "neither"
        raise InputError(
            f"observation file {where}: expected the observation error as a scalar attribute 'obs_error_std' "
            f"or a variable 'obs_error_std({obs_dim_name})', got {state}"
        )
    if in_attrs:
        std = _positive_number(ds.attrs["obs_error_std"])
        if std is None:
            given = _short(ds.attrs["obs_error_std"])
            raise InputError(f"observation file {where}: 'obs_error_std' must be one positive number, got {given}")
        return ObservationError(std=std)
    var = ds["obs_error_std"]
    if var.dims != (obs_dim_name,) or var.dtype.kind not in "fiu":
        raise InputError(f"observation file {where}: expected numeric obs_error_std({obs_dim_name}), got dims {var.dims} of dtype {var.dtype}")
    std = np.asarray(var.values, dtype=np.float64).copy()
    observed = ~np.isnan(values).all(axis=0)
    bad = observed & ~(np.isfinite(std) & (std > 0))
    if bad.any():
        k = int(np.nonzero(bad)[0][0])
        raise InputError(f"observation file {where}: obs_error_std must be positive where observed, got {std[k]!r} at index {k}")
    std[~observed] = 1.0  # never used: that column holds no observation
    return ObservationError(std=torch.as_tensor(std))


def _positive_number(value) -> float | None:
    """``value`` (a netCDF attribute) as one positive finite float, or None if it is not one."""
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    if array.size != 1 or not np.isfinite(array[0]) or array[0] <= 0:
        return None
    return float(array[0])


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
