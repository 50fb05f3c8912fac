"""Out-of-core passes over a (dask-backed) variable, a block of time steps at a time.

For variables larger than memory (``xr.open_mfdataset(..., chunks=...)`` over many files) the
statistics geonn needs are sums that accumulate block by block: the training climatology and
scale of :class:`~geonn.fields.Normaliser` (:func:`fit_normaliser`), and products with a few
vectors for the randomised EOF (:func:`geonn.emulators.eof.fit_eof_blocks`). Only one block of
``(block, channel, lat, lon)`` values is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import xarray as xr

from ..errors import InputError
from .grid import Grid
from .normalise import Normaliser
from .tensors import field_array


def time_blocks(da: xr.DataArray, grid: Grid, times: slice, block: int, dtype=torch.float32) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield ``(steps, values, mask)`` for consecutive blocks of ``block`` time steps within ``times``.

    ``values`` is ``(steps, channel, lat, lon)`` (south to north, 0 where missing) and ``mask`` is
    True where the data are finite; only these steps are read from disk.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise InputError(f"block: expected an int >= 1, got {block!r}")
    start, stop = times.start or 0, times.stop if times.stop is not None else da.sizes[grid.time]
    for first in range(start, stop, block):
        steps = slice(first, min(first + block, stop))
        array = field_array(da.isel({grid.time: steps}), grid)
        mask = np.isfinite(array)
        values = torch.from_numpy(np.where(mask, array, 0)).to(dtype)
        yield steps, values, torch.from_numpy(mask)


def fit_normaliser(normaliser: Normaliser, da: xr.DataArray, grid: Grid, train: slice, groups: torch.Tensor,
                   block: int = 64) -> Normaliser:
    """Fit ``normaliser`` on the training steps of ``da`` in one pass, out of core.

    The same statistics as :meth:`Normaliser.fit` (climatology per calendar group, then the
    standard deviation of the anomalies over the dimensions its ``scale`` names), accumulated as
    float64 sums, sums of squares and counts per (group, channel, lat, lon).
    """
    n_groups = int(groups[train].max()) + 1
    sums = sums_sq = counts = None
    for steps, values, mask in time_blocks(da, grid, train, block, torch.float64):
        one_hot = torch.nn.functional.one_hot(groups[steps], n_groups).double()  # (time, group)
        if sums is None:
            shape = (n_groups, *values.shape[1:])
            sums, sums_sq, counts = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
        flat = values.reshape(values.shape[0], -1)  # a matrix product per statistic: no (time, group, point) temporary
        sums += (one_hot.T @ flat).reshape(sums.shape)
        sums_sq += (one_hot.T @ (flat * flat)).reshape(sums.shape)
        counts += (one_hot.T @ mask.reshape(mask.shape[0], -1).double()).reshape(sums.shape)
    if sums is None or not bool((counts > 0).any()):
        raise InputError("train: expected some finite training values, got none")
    climatology = sums / counts.clamp_min(1)
    squared = (sums_sq - climatology * sums).clamp_min(0)  # sum of squared anomalies per group and point
    dims = {"global": (0, 1, 2, 3), "channel": (0, 2, 3), "point": (0,), None: None}[normaliser.scale]
    if dims is None:
        std = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    else:
        n = counts.sum(dims, keepdim=True)
        std = (squared.sum(dims, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
        std = torch.where(std > 0, std, 1)
    normaliser.climatology, normaliser.std = climatology.float(), std.float()  # std: (1, 1|channel, 1|lat, 1|lon)
    normaliser.counts = counts.to(torch.int64)
    return normaliser
