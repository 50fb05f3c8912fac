"""Trajectories (tensors, time first) <-> labelled ``xarray.Dataset`` with CF-style metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from ..errors import InputError, InputTypeError, describe

TIME_ATTRS = {"long_name": "time", "units": "model time units", "axis": "T"}


def trajectory_to_dataset(
    trajectories: Mapping[str, torch.Tensor],
    times,
    component_names: Sequence[str],
    *,
    variable_attrs: Mapping[str, Mapping] | None = None,
    attrs: Mapping | None = None,
) -> xr.Dataset:
    """Label trajectories of shape ``(time, component)`` or ``(time, member, component)``.

    Args:
        trajectories: variable name -> tensor; all share the time and component axes.
        times: 1-D times (model time units), one per row.
        component_names: names of the state components (the ``component`` coordinate).
        variable_attrs: variable name -> attributes (``long_name``, ``units``...).
        attrs: global attributes; values must be str, int, float or lists of them (netCDF-safe).
    """
    if isinstance(component_names, (str, bytes)) or not isinstance(component_names, Sequence):
        raise InputTypeError(f"component_names: expected a sequence of names, got {describe(component_names)}")
    try:
        times = np.asarray(times.detach().cpu() if isinstance(times, torch.Tensor) else times, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputTypeError(f"times: expected a 1-D sequence of numbers, got {describe(times)}") from None
    if times.ndim != 1:
        raise InputError(f"times: expected a 1-D sequence of times, got shape {times.shape}")
    if not isinstance(trajectories, Mapping):
        raise InputTypeError(f"trajectories: expected a mapping of names to tensors, got {describe(trajectories)}")
    coords = {
        "time": ("time", times, dict(TIME_ATTRS)),
        "component": ("component", np.asarray(list(component_names), dtype=str), {"long_name": "state component"}),
    }
    data_vars = {}
    for name, tensor in trajectories.items():
        if not isinstance(tensor, (torch.Tensor, np.ndarray)) or tensor.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise InputTypeError(f"trajectories[{name!r}]: expected a real tensor (time, [member,] component), got {describe(tensor)}")
        if isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()  # numpy has no bfloat16; netCDF no float16
        array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        if array.ndim == 2:
            dims = ("time", "component")
        elif array.ndim == 3:
            dims = ("time", "member", "component")
            coords.setdefault("member", ("member", np.arange(array.shape[1]), {"long_name": "ensemble member"}))
        else:
            raise InputError(f"trajectories[{name!r}]: expected shape (time, component) or (time, member, component), got {array.shape}")
        if array.shape[0] != times.size or array.shape[-1] != len(component_names):
            raise InputError(
                f"trajectories[{name!r}]: expected {times.size} times and {len(component_names)} components, got shape {array.shape}"
            )
        data_vars[name] = (dims, array, dict((variable_attrs or {}).get(name, {})))
    return xr.Dataset(data_vars, coords=coords, attrs=dict(attrs or {}))


def dataset_to_trajectory(ds: xr.Dataset, variable: str, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor ``(time, [member,] component)`` of ``ds[variable]`` and its times ``(time,)``."""
    if not isinstance(ds, xr.Dataset):
        raise InputTypeError(f"ds: expected an xarray.Dataset, got {describe(ds)}")
    if variable not in ds.data_vars:
        raise InputError(f"variable: expected one of {sorted(ds.data_vars)}, got {variable!r}")
    da = ds[variable]
    if "time" not in da.dims or "component" not in da.dims:
        raise InputError(f"{variable}: expected dimensions (time, [member,] component), got {da.dims}")
    order = [d for d in ("time", "member", "component") if d in da.dims]
    if len(order) != da.ndim:
        raise InputError(f"{variable}: unexpected dimensions {da.dims}; expected a subset of (time, member, component)")
    values = torch.as_tensor(np.asarray(da.transpose(*order).values, dtype=np.float64), dtype=dtype)
    times = torch.as_tensor(np.array(ds["time"].values, dtype=np.float64))
    return values, times
