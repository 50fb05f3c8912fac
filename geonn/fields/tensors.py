"""Gridded ``xarray.DataArray`` <-> tensors ``(time, channel, lat, lon)`` with a validity mask.

Tensors always run time first, channels (the flattened extra dimensions) second, latitude south
to north, longitude last; missing values (NaN) become 0 in the values and ``False`` in the mask.
Outputs are rebuilt with ``like.copy(data=...)``, so coordinates, attributes and encodings of
the user's variable survive, in the user's dimension order and latitude direction.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..errors import InputError, InputTypeError, describe
from .grid import Grid, check_grid, find_grid


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """The floating dtype that holds ``dtype`` (float32 for float16 and small integers, float64 beyond)."""
    return np.result_type(np.dtype(dtype), np.float32)


def field_array(da: xr.DataArray, grid: Grid) -> np.ndarray:
    """The values of ``da`` as a numpy array ``(time, channel, lat, lon)``, latitude south to north.

    Only ``da`` is loaded: pass a slice (``da.isel(time=...)``) to read part of a dask-backed variable.
    """
    ordered = da.transpose(*grid.tensor_dims)
    if grid.lat_descending:
        ordered = ordered.isel({grid.lat: slice(None, None, -1)})
    values = np.asarray(ordered.values)
    values = values.astype(_float_dtype(values.dtype), copy=False)
    return values.reshape(values.shape[0], grid.n_channels, values.shape[-2], values.shape[-1])


def to_tensor(da: xr.DataArray, grid: Grid | None = None, *, dtype: torch.dtype | None = None):
    """Load ``da`` as tensors.

    Args:
        da: a variable with time, latitude and longitude dimensions (see :func:`find_grid`).
            It is loaded whole; for variables larger than memory use :class:`FieldBatches`.
        grid: the layout, found from ``da`` when not given.
        dtype: the tensor dtype; by default that of ``da`` (float32 stays float32, so a round
            trip is exact; integers become float32 or float64).

    Returns:
        ``(values, mask, grid)``: ``values`` of shape ``(time, channel, lat, lon)`` with NaN
        replaced by 0, ``mask`` (bool, same shape, True where the input is finite) and the grid.

    Example:
        >>> values, mask, grid = to_tensor(ds["air_temperature"])
        >>> back = from_tensor(values, like=ds["air_temperature"], grid=grid, mask=mask)
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InputTypeError(f"dtype: expected a floating torch dtype or None, got {describe(dtype)}")
    grid = find_grid(da) if grid is None else grid
    check_grid(da, grid)
    array = field_array(da, grid)
    mask = np.isfinite(array)
    array = np.where(mask, array, 0)
    values = torch.from_numpy(np.ascontiguousarray(array))
    if dtype is not None:
        values = values.to(dtype)
        if not bool(torch.isfinite(values).all()):
            largest = float(np.abs(array).max())
            raise InputError(f"dtype: the values of da (up to {largest:.3g} in magnitude) overflow {dtype}; use torch.float64")
    return values, torch.from_numpy(mask), grid


def from_tensor(values: torch.Tensor, like: xr.DataArray, grid: Grid | None = None, *, mask="like") -> xr.DataArray:
    """Put ``values`` ``(time, channel, lat, lon)`` back into the layout of ``like``.

    Args:
        values: tensor of shape ``grid.tensor_shape()`` (the number of times of ``like``).
        like: the variable whose dimensions, coordinates, attributes, encoding and name the
            result takes (a slice ``like.isel(time=...)`` for part of the times).
        grid: the layout of ``like``; found from ``like`` when not given.
        mask: where the result is NaN. ``"like"`` (default): where ``like`` is NaN; a bool
            tensor broadcastable to ``values`` (True = valid, e.g. the mask of :func:`to_tensor`):
            NaN where it is False; ``None``: no NaN are put in.

    Returns:
        A DataArray like ``like``, of ``like``'s dtype when floating (float32/float64 for integers).
    """
    grid = find_grid(like) if grid is None else grid
    check_grid(like, grid, "like")
    if not isinstance(values, torch.Tensor):
        raise InputTypeError(f"values: expected a torch.Tensor, got {describe(values)}")
    expected = grid.tensor_shape(like.sizes[grid.time])
    if tuple(values.shape) != expected:
        raise InputError(f"values: expected shape {expected} (time, channel, lat, lon) of like, got {tuple(values.shape)}")
    array = values.detach().cpu().numpy().astype(_float_dtype(like.dtype))
    if isinstance(mask, str) and mask == "like":
        array = np.where(np.isfinite(field_array(like, grid)), array, np.nan)
    elif mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputTypeError(f"mask: expected 'like', None or a bool tensor, got {describe(mask)}")
        try:
            valid = np.broadcast_to(mask.detach().cpu().numpy(), array.shape)
        except ValueError:
            raise InputError(f"mask: expected a shape broadcastable to {expected}, got {tuple(mask.shape)}") from None
        array = np.where(valid, array, np.nan)
    array = array.reshape(expected[:1] + grid.channel_sizes + expected[2:])
    if grid.lat_descending:
        array = np.flip(array, axis=-2)
    order = grid.tensor_dims
    array = np.ascontiguousarray(array.transpose([order.index(d) for d in grid.dims]))
    return like.copy(data=array)


def area_weights(grid: Grid, mask: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Latitude weights ``cos(latitude)``, zero where masked, summing to 1 over (lat, lon).

    Args:
        grid: the layout; its latitudes (degrees) give the weights.
        mask: optional bool tensor ``(..., lat, lon)`` (True = valid); masked points weigh 0
            and the weights of each field renormalise over its valid points (a field with no
            valid point weighs 0 everywhere).
        dtype: the floating dtype of the result.

    Returns:
        ``(lat, lon)`` weights, or the broadcast shape of ``(lat, lon)`` and ``mask``. A weighted
        mean over the grid is ``(weights * x).sum((-2, -1))``.
    """
    if not isinstance(grid, Grid):
        raise InputTypeError(f"grid: expected a geonn.fields.Grid (from find_grid), got {describe(grid)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputTypeError(f"dtype: expected a floating torch dtype, got {describe(dtype)}")
    if grid.latitudes is None:
        raise InputError(f"grid: latitude dimension {grid.lat!r} has no numeric 1-D coordinate; area weights need latitudes in degrees")
    latitudes = torch.tensor(grid.latitudes, dtype=torch.float64)
    if latitudes.numel() == 0:
        raise InputError(f"grid: expected at least one latitude along {grid.lat!r}, got none")
    if not bool(torch.isfinite(latitudes).all()) or latitudes.abs().max() > 90:
        raise InputError(
            f"grid: expected latitudes in degrees within [-90, 90] along {grid.lat!r}, got values up to "
            f"{float(latitudes.abs().max()):g} (a projected y coordinate has no latitude weights)"
        )
    n_lon = grid.size(grid.lon)
    weights = torch.cos(torch.deg2rad(latitudes)).clamp_min(0)[:, None].expand(-1, n_lon)
    if not bool((weights > 0).any()):
        raise InputError(f"grid: expected some latitude away from the poles, got {grid.latitudes}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputTypeError(f"mask: expected a bool tensor (..., lat, lon), got {describe(mask)}")
        if mask.dim() < 2 or tuple(mask.shape[-2:]) != tuple(weights.shape):
            raise InputError(f"mask: expected shape (..., {weights.shape[0]}, {n_lon}), got {tuple(mask.shape)}")
        weights = weights * mask
    total = weights.sum((-2, -1), keepdim=True)
    weights = torch.where(total > 0, weights / torch.where(total > 0, total, 1), 0)
    return weights.to(dtype).contiguous()
